"""Presets and checkpoint loading, with real networks (vista3d132 included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib.model import build_network, extract_state_dict, load_model, load_state


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_small_preset_size() -> None:
    assert 5.6e6 < n_params(build_network("small")) < 5.8e6


def test_vista3d132_checkpoint_round_trip(tmp_path: Path) -> None:
    """A checkpoint written from a freshly built vista3d132 loads strictly, key for key."""
    torch.manual_seed(1)
    source = build_network("vista3d")
    assert 2.1e8 < n_params(source) < 2.3e8
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    saved_keys = set(torch.load(path, map_location="cpu", weights_only=True))
    del source
    target = build_network("vista3d")
    assert saved_keys == set(target.state_dict()), "checkpoint keys are the network's keys"
    load_state(target, path)
    reference = torch.load(path, map_location="cpu", weights_only=True)
    for key in (
        "image_encoder.encoder.conv_init.weight",
        "point_head.class_embeddings.weight",
        "class_head.class_embeddings.weight",
    ):
        assert torch.equal(target.state_dict()[key], reference[key])


def test_wrapped_and_ddp_checkpoints_load(tmp_path: Path) -> None:
    source = build_network("small")
    wrapped = {"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    path = tmp_path / "ddp.pt"
    torch.save(wrapped, path)
    target = build_network("small")
    load_state(target, path)
    key = "point_head.mask_tokens.weight"
    assert torch.equal(target.state_dict()[key], source.state_dict()[key])


def test_wrong_preset_names_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    torch.save(build_network("small").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit this preset: .* missing keys"):
        load_state(build_network("vista3d"), path)


def test_not_a_state_dict() -> None:
    with pytest.raises(ValueError, match="no state dict"):
        extract_state_dict({"model": "nope"})


def test_no_weights_warns_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loaded = load_model("small", "none", tmp_path, torch.device("cpu"))
    assert loaded.warning and "RANDOM weights" in loaded.warning
    assert "RANDOM weights" in caplog.text
    assert loaded.version == "small:random"


def test_missing_weights_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model("small", str(tmp_path / "nope.pt"), tmp_path, torch.device("cpu"))
