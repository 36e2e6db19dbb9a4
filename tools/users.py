#!/usr/bin/env python
"""Manage a team server's users: names, roles (user, annotator, reviewer, admin) and passwords.

    .venv/bin/python tools/users.py --studies ./studies add alice --role annotator   # password from stdin
    .venv/bin/python tools/users.py --studies ./studies list
    .venv/bin/python tools/users.py --studies ./studies set-role alice reviewer
    .venv/bin/python tools/users.py --studies ./studies set-password alice            # password from stdin
    .venv/bin/python tools/users.py --studies ./studies remove alice

The store is ``<studies>/.vista3d/users.json`` (a DICOMweb URL: the app's ``model/`` folder), or
``--users PATH`` as given to the server with ``--conf users PATH``. A running server reads changes
at its next request: a removed user is signed out, a new role counts at once, and adding the first
user turns sign-in on (``--conf auth auto``, the default). Passwords are read from standard input
(twice, without echo, on a terminal), never from the command line, where other users could see them.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vista3d"))

from lib.server.users import Role, UserError, UserStore
from lib.settings import users_path

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "vista3d"


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise UserError("the two passwords differ")
    return first


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--studies", help="the server's --studies (a folder or a DICOMweb URL)")
    where.add_argument("--users", type=Path, help="the user file itself (--conf users PATH)")
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a user (password from stdin)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.label for r in Role])
    sub.add_parser("list", help="names and roles")
    role = sub.add_parser("set-role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=[r.label for r in Role])
    password = sub.add_parser("set-password", help="a new password (from stdin); earlier sign-ins end")
    password.add_argument("name")
    remove = sub.add_parser("remove", help="remove a user; their sign-ins end")
    remove.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    store = UserStore(users_path(args.users, args.studies, APP_DIR))
    try:
        if args.action == "add":
            store.add(args.name, Role.parse(args.role), _read_password())
        elif args.action == "set-role":
            store.set_role(args.name, Role.parse(args.role))
        elif args.action == "set-password":
            store.set_password(args.name, _read_password())
        elif args.action == "remove":
            store.remove(args.name)
    except UserError as e:
        p.error(str(e))
    for user in store.list():
        print(f"{user.name}\t{user.role.label}")
    if args.action != "list":
        print(f"({store.path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
