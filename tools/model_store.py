#!/usr/bin/env python
"""Show or roll back the served model of a datastore's model store (see lib/model_store.py).

    .venv/bin/python tools/model_store.py show --studies ./studies
    .venv/bin/python tools/model_store.py rollback --studies ./studies

A running server serves the rolled-back version from its next request on; no restart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vista3d"))

from lib.model_store import ModelStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("show", "rollback"))
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--studies", type=Path, help="a local datastore (store in <studies>/.vista3d/models)")
    where.add_argument("--store", type=Path, help="the store folder itself (--conf model_store)")
    args = p.parse_args(argv)
    root = args.store or args.studies / ".vista3d" / "models"
    if not root.is_dir():
        p.error(f"no model store at {root}")
    store = ModelStore(root)
    if args.action == "rollback":
        try:
            store.rollback()
        except ValueError as e:
            p.error(str(e))
    print(json.dumps(store.summary(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
