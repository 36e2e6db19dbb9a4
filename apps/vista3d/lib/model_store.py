"""The served model's versions: promotion, rollback and a manifest that serving and training share.

Layout of the store folder::

    manifest.json   which version is served, every kept version's validation figures, past rounds, rollbacks
    v1.pt, v2.pt    learned versions (float16 state dicts); version 0 is the configured base weights
    split.json      the validation split (:mod:`.trainers.split`)

Every write is a temp file in the folder and a rename, so a training process killed at any moment
leaves the previous manifest and checkpoints whole; leftover temp files are removed by the next
training. Every change of the manifest (a promotion from its version number to its rename, a
recorded round, a rollback) holds ``.manifest.lock``: replicas of the server share the folder, and
a rollback on one must not be overwritten by a round's promotion started on another. The server
compares the manifest's served version with the one it holds before each request and reloads
without a restart (:class:`ModelReloader`), so a promotion or rollback reaches every replica.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from .atomic import FileVersion, file_version, write_json
from .failpoints import failpoint

if TYPE_CHECKING:  # torch and MONAI load only where weights are written or read: the rollback tool needs neither
    import torch

    from .model import LoadedModel

__all__ = ["ModelReloader", "ModelStore", "ServedVersion"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
KEEP_VERSIONS = 5
KEEP_ROUNDS = 50


@dataclass(frozen=True)
class ServedVersion:
    """One entry of the manifest; ``file`` is None for version 0 (the configured base weights)."""

    version: int
    file: str | None
    validation: dict[str, Any] | None = None
    trained_on: list[str] = field(default_factory=list)
    created: str = ""


def _add_round(manifest: dict[str, Any], round_info: dict[str, Any], seen: list[str], promoted: int | None) -> None:
    """Append a round to the history (last 50) and mark the labels it saw."""
    manifest["seen"] = sorted(set(manifest.get("seen", [])) | set(seen))
    manifest["rounds"] = [*manifest.get("rounds", []), {**round_info, "promoted": promoted}][-KEEP_ROUNDS:]


class ModelStore:
    """Versions of the served weights in one folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / MANIFEST

    @contextmanager
    def editing(self) -> Iterator[dict[str, Any]]:
        """The manifest as the last writer (in any process) left it, written back when the block ends."""
        with FileLock(str(self.root / LOCK)):
            m = self.manifest()
            yield m
            write_json(self.manifest_path, m)

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"served": 0, "versions": [{"version": 0, "file": None}], "rounds": []}
        return json.loads(self.manifest_path.read_text())

    def stamp(self) -> FileVersion | None:
        """Changes whenever the manifest is replaced (cheap to poll before each request)."""
        return file_version(self.manifest_path)

    def _entry(self, manifest: dict[str, Any], version: int) -> ServedVersion:
        for v in manifest["versions"]:
            if v["version"] == version:
                return ServedVersion(**{k: v[k] for k in ServedVersion.__dataclass_fields__ if k in v})
        raise KeyError(f"version {version} is not in the store {self.root}")

    def served(self) -> ServedVersion:
        m = self.manifest()
        return self._entry(m, int(m["served"]))

    def path_of(self, entry: ServedVersion) -> Path | None:
        return self.root / entry.file if entry.file else None

    def remove_temp_files(self) -> list[str]:
        """Leftovers of a killed writer (only one training runs at a time, so none is in progress).

        Temporary files, and weights files the manifest does not list: a promotion killed after its
        weights file was written and before the manifest was replaced (the served version is then
        the previous one, complete).
        """
        with FileLock(str(self.root / LOCK)):  # no promotion between its weights file and its manifest
            listed = {v["file"] for v in self.manifest()["versions"] if v["file"]}
            leftovers = [*self.root.glob(".*.tmp"), *(p for p in self.root.glob("v*.pt") if p.name not in listed)]
            for p in leftovers:
                p.unlink(missing_ok=True)
        removed = [p.name for p in leftovers]
        if removed:
            logger.warning("Removed %d files left by an interrupted training or promotion: %s", len(removed), removed)
        return removed

    def promote(
        self,
        network: torch.nn.Module,
        validation: dict[str, Any],
        trained_on: list[str],
        round_info: dict[str, Any],
        seen: list[str],
    ) -> ServedVersion:
        """Write ``network`` as the next version and serve it; older versions beyond 5 are deleted.

        ``seen`` are the label stamps this round looked at (training and validation): the learning
        loop counts only labels no round has seen as pending.
        """
        from .model import save_state

        with self.editing() as m:
            version = max(int(v["version"]) for v in m["versions"]) + 1
            file = f"v{version}.pt"
            save_state(network, self.root / file)
            failpoint("promote.weights_written")
            entry = {
                "version": version,
                "file": file,
                "validation": validation,
                "trained_on": sorted(trained_on),
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            m["versions"].append(entry)
            m["served"] = version
            dropped = [v for v in m["versions"] if v["file"]][:-KEEP_VERSIONS]
            m["versions"] = [v for v in m["versions"] if v not in dropped]
            _add_round(m, round_info, seen, promoted=version)
        for v in dropped:
            (self.root / v["file"]).unlink(missing_ok=True)
        logger.info("Promoted v%d (%s)", version, validation)
        return self._entry(m, version)

    def record_round(self, round_info: dict[str, Any], seen: list[str]) -> None:
        """Keep a round that promoted nothing (with why) in the manifest's history."""
        with self.editing() as m:
            _add_round(m, round_info, seen, promoted=None)

    def update_validation(self, validation: dict[str, Any]) -> None:
        """Store the served version's figures on the current validation split."""
        with self.editing() as m:
            for v in m["versions"]:
                if v["version"] == m["served"]:
                    v["validation"] = validation

    def rollback(self) -> ServedVersion:
        """Serve the newest kept version older than the served one."""
        with self.editing() as m:
            older = [int(v["version"]) for v in m["versions"] if int(v["version"]) < int(m["served"])]
            if not older:
                raise ValueError(f"no version older than v{m['served']} is kept in {self.root}")
            back = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "from": int(m["served"]), "to": max(older)}
            m["rollbacks"] = [*m.get("rollbacks", []), back][-KEEP_ROUNDS:]  # the served version's history
            m["served"] = max(older)
        logger.warning("Rolled back to v%d", m["served"])
        return self._entry(m, int(m["served"]))

    def summary(self) -> dict[str, Any]:
        """What ``/info`` shows: the served version, its validation figures, the last round."""
        m = self.manifest()
        served = self._entry(m, int(m["served"]))
        rounds = m.get("rounds", [])
        return {
            "served_version": served.version,
            "validation": served.validation,
            "trained_on_labels": len(served.trained_on),
            "versions": [int(v["version"]) for v in m["versions"]],
            "last_round": rounds[-1] if rounds else None,
        }


class ModelReloader:
    """Keeps the served :class:`LoadedModel` on the store's served version.

    ``base_weights`` is what version 0 means (the configured checkpoint, or None for random).
    A reload loads into a new network and then swaps it in, so a request already running keeps a
    consistent network; the engine's cached encoder features are keyed by the version and drop.
    """

    def __init__(self, model: LoadedModel, store: ModelStore) -> None:
        self.model = model
        self.store = store
        self.base_weights = model.weights
        self._stamp: FileVersion | None = (-1, -1, -1)  # no manifest read yet
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> bool:
        """Load the served version if the manifest changed; True when the weights were swapped."""
        stamp = self.store.stamp()
        if stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            served = self.store.served()
            swapped = served.version != self.model.served_version
            if swapped:
                from .model import build_network, load_state

                path = self.store.path_of(served)
                network = build_network(self.model.preset)
                if path is not None:
                    load_state(network, path)
                    weights = str(path)
                elif self.base_weights is not None:
                    load_state(network, self.base_weights)
                    weights = self.base_weights
                else:
                    weights = None
                network.to(self.model.device).eval()
                self.model.network = network
                self.model.weights = weights
                if path is not None:
                    self.model.warning = None  # a learned version is no longer random
                self.model.served_version = served.version
                logger.info("Serving v%d: weights %s, validation %s", served.version, weights, served.validation)
            self._stamp = stamp
            return swapped
