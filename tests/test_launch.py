"""What the server's command line and its start log tell a newcomer."""

from __future__ import annotations

import pytest

from lib.server.launch import EMBEDDED_ORTHANC, PUBLIC_HOST_ENV, PUBLIC_PORT_ENV, bind_host, bind_port, getting_started


def test_host_and_port_come_from_monai_labels_command_line_or_its_defaults() -> None:
    argv = ["start_server", "--app", "a", "--studies", "s", "--host", "127.0.0.1", "-p", "8123"]
    assert (bind_host(argv), bind_port(argv)) == ("127.0.0.1", 8123)
    assert (bind_host(["start_server"]), bind_port(["start_server"])) == ("0.0.0.0", 8000)


def test_a_replica_behind_a_balancer_takes_the_balancers_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loopback replica behind a public HAProxy keeps a public server's checks and shows the public URL."""
    monkeypatch.setattr("sys.argv", ["monailabel", "start_server", "--host", "127.0.0.1", "--port", "8001"])
    assert (bind_host(), bind_port()) == ("127.0.0.1", 8001)
    monkeypatch.setenv(PUBLIC_HOST_ENV, "0.0.0.0")
    monkeypatch.setenv(PUBLIC_PORT_ENV, "8000")
    assert (bind_host(), bind_port()) == ("0.0.0.0", 8000)
    assert bind_host(["--host", "127.0.0.1"]) == "127.0.0.1", "an explicit command line is read as it is"


def test_the_start_log_says_where_ohif_is_and_how_to_add_a_study_and_the_first_user() -> None:
    lines = getting_started("0.0.0.0", 8000, EMBEDDED_ORTHANC, users=0)
    assert lines[0].startswith("OHIF viewer: http://127.0.0.1:8000/ohif/")
    assert lines[1] == "add a study: make add STUDY=<NIfTI CT, DICOM folder or zip>"
    assert "make user NAME=<name> ROLE=admin" in lines[2] and "sign-in is off" in lines[2]


def test_another_datastore_is_named_in_each_command_and_users_turn_sign_in_on() -> None:
    lines = getting_started("10.0.0.5", 9000, "./studies", users=3)
    assert lines[0].startswith("OHIF viewer: http://10.0.0.5:9000/ohif/")
    assert "STUDIES=./studies" in lines[1] and "OHIF needs DICOMweb" in lines[1]
    assert "sign-in is on: 3 user(s)" in lines[2] and "STUDIES=./studies" in lines[2]
    assert getting_started("127.0.0.1", 8000, "./studies", users=3, auth="off")[2] == "sign-in is off (--conf auth off)"
