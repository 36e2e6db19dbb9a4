"""Settings parsed once from --conf; the packaged label dictionary agrees with ../shared/data."""

from __future__ import annotations

import json

import pytest

from lib.labels import load_label_dictionary
from lib.settings import Settings

from .conftest import DATA


def test_defaults() -> None:
    s = Settings.from_conf({})
    assert s.preset == "small" and s.weights == "starter" and s.device == "auto"
    assert s.threads >= 1 and s.session_cache_mb == 4096 and s.precision == "auto"


def test_train_clicks_reach_a_loop_rounds_request() -> None:
    """A round the loop starts has no request keys: its gate clicks come from the setting."""
    from lib.trainers.request import TrainRequest

    assert TrainRequest.parse({}, Settings.from_conf({}), 64).clicks == 5
    assert TrainRequest.parse({}, Settings.from_conf({"train_clicks": "2"}), 64).clicks == 2
    assert TrainRequest.parse({"clicks": 3}, Settings.from_conf({"train_clicks": "2"}), 64).clicks == 3


def test_a_password_in_the_state_url_is_never_in_the_logged_settings_or_errors() -> None:
    url = "postgresql://vista:s3cret@db:5432/state"
    settings = Settings.from_conf({"state": url})
    assert settings.state == url, "the store still connects with it"
    assert "s3cret" not in repr(settings)
    with pytest.raises(ValueError) as refused:
        Settings.from_conf({"state": "mysql://vista:s3cret@db/state"})
    assert "s3cret" not in str(refused.value) and "vista:***@db" in str(refused.value)


def test_state_is_sqlite_by_default_or_a_postgresql_url() -> None:
    assert Settings.from_conf({}).state == ""
    assert (
        Settings.from_conf({"state": " postgresql://vista@db:5432/state "}).state == "postgresql://vista@db:5432/state"
    )


def test_vista3d_preset_defaults_to_official_weights() -> None:
    assert Settings.from_conf({"preset": "vista3d"}).weights == "official"
    assert Settings.from_conf({"preset": "vista3d", "weights": "/x.pt"}).weights == "/x.pt"


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"preset": "big"}, "preset must be one of"),
        ({"threads": "two"}, "must be an integer"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"run_limit_s": "0"}, "run_limit_s must be at least 1.0"),
        ({"queue_wait_s": "soon"}, "queue_wait_s must be a number"),
        ({"train_clicks": "0"}, "train_clicks must be at least 1"),
        ({"train_clicks": "21"}, "train_clicks must be at most 20"),
        ({"state": "mysql://db"}, "state must be empty"),
    ],
)
def test_bad_conf(conf: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_conf(conf)


def test_packaged_dictionary_matches_shared_copy() -> None:
    packaged = load_label_dictionary()
    shared = json.loads((DATA / "vista3d_labels.json").read_text())
    assert {int(k): v.lower() for k, v in shared["classes"].items()} == packaged.classes
    assert set(shared["special_point_classes"]) == packaged.special


def test_served_labels_are_the_127_supported_classes() -> None:
    labels = load_label_dictionary()
    served = labels.served_labels()
    assert len(served) == 127
    assert not set(served.values()) & labels.unsupported
    assert labels.expand_groups([2, 1, 5]) == [14, 5, 1]
