"""The dataset archive on its own: MONAI Label's layout, every byte of every file, handed out in bounded pieces."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from lib.data.dataset_zip import CHUNK, dataset_zip


def test_the_archive_holds_each_pair_and_the_metadata_and_comes_in_bounded_pieces(tmp_path: Path) -> None:
    files = {}
    for name, size in (("a.nii.gz", 3 * CHUNK + 17), ("b.nii.gz", 10)):
        for key in ("image", "label"):
            path = tmp_path / key / name
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256) + key.encode())
            files[f"{key}/{name}"] = path
    pairs = [
        {"image": str(tmp_path / "image" / n), "label": str(tmp_path / "label" / n)} for n in ("a.nii.gz", "b.nii.gz")
    ]

    pieces = list(dataset_zip(pairs, '{"objects": {}}'))
    assert len(pieces) > 4 and max(len(p) for p in pieces) <= CHUNK + 4096, "streamed, not built whole"
    with zipfile.ZipFile(io.BytesIO(b"".join(pieces))) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == sorted([*files, "metadata.json"])
        for arcname, path in files.items():
            assert archive.read(arcname) == path.read_bytes()
        assert archive.read("metadata.json") == b'{"objects": {}}'
