"""What a run read, as a record a resumed run compares: the source weights, the calibration windows
and the tokenizer files.

Weights: per safetensors file its size, mtime_ns and sha256. The sha256 of a multi-gigabyte model
is seconds of reading, so it runs in a background thread while the blocks are compressed (hashlib
and file reads release the GIL; the reads also warm the page cache the lazy loader reads from). A
record saved before a file's hash is done holds `"sha256": null` for it; a resumed run then falls
back to size and mtime for that file. Calibration: the sha256 of the windows' token ids (dtype,
shape and bytes), so other text, tokenization or sampling shows even under the same flags;
data-free recipes have none. Tokenizer: the sha256 of each of its files that is present.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import torch

from .errors import InputsChanged

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
CHUNK = 8 << 20


def sha256_of_file(path: Path, stop: threading.Event | None = None) -> str | None:
    """The file's sha256 hex digest; None when `stop` is set before the end (the run ended)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if stop is not None and stop.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()


def windows_sha256(windows: torch.Tensor) -> str:
    ids = windows.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{ids.dtype} {list(ids.shape)}\n".encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


class Inputs:
    """The fingerprint of one run's inputs; the weights' sha256s arrive from a background thread."""

    def __init__(self, model_dir: Path | None, windows: torch.Tensor | None = None):
        self.files = sorted(model_dir.glob("*.safetensors")) if model_dir is not None else []
        self.stats = {f.name: {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in self.files}
        self.digests: dict[str, str] = {}
        self.calibration = windows_sha256(windows) if windows is not None else None
        self.tokenizer = {name: sha256_of_file(model_dir / name) for name in TOKENIZER_FILES
                          if model_dir is not None and (model_dir / name).is_file()}
        self.seconds = self.cpu_seconds = 0.0  # the hashing's wall and CPU time (benchmarks/fingerprint_cost.py)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hash_weights, name="layerwise-fingerprint", daemon=True)
        self._thread.start()

    def _hash_weights(self) -> None:
        start = time.perf_counter()
        for f in self.files:
            try:
                digest = sha256_of_file(f, self._stop)
            except OSError:  # vanished or unreadable: the record keeps size and mtime only
                digest = None
            if digest is None:
                return
            self.digests[f.name] = digest
            self.seconds, self.cpu_seconds = time.perf_counter() - start, time.thread_time()
        log.debug("fingerprint: %d weight files hashed in %.2f s", len(self.files), self.seconds)

    def record(self, wait: bool = False) -> dict:
        """The run record's `inputs` entry (wait: until every weight file is hashed)."""
        if wait:
            self._thread.join()
        weights = {name: {**stat, "sha256": self.digests.get(name)} for name, stat in self.stats.items()}
        return {"weights": weights, "calibration": self.calibration, "tokenizer": self.tokenizer}

    def stop(self) -> None:
        self._stop.set()


def check_same_inputs(before: dict | None, now: dict) -> None:
    """Raise InputsChanged naming what differs between the unfinished run's inputs and these."""
    if not before:  # a run record written before inputs were fingerprinted: nothing to compare
        return
    changed = _changed_weights(before.get("weights") or {}, now["weights"])
    if changed:
        _refuse("the source weights", ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
    if before.get("calibration") != now["calibration"]:
        _refuse("the calibration windows", "other token ids from the --calib text, its tokenization or sampling")
    tokenizer = sorted(n for n in set(before.get("tokenizer") or {}) | set(now["tokenizer"])
                       if (before.get("tokenizer") or {}).get(n) != now["tokenizer"].get(n))
    if tokenizer:
        _refuse("the tokenizer", ", ".join(tokenizer))


def _changed_weights(before: dict, now: dict) -> list[str]:
    """Names of the weight files added, removed or changed (sha256 when both know it, else size and mtime)."""
    changed = []
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name), now.get(name)
        if old is None or new is None or old.get("size") != new["size"]:
            changed.append(name)
        elif old.get("sha256") and new.get("sha256"):
            if old["sha256"] != new["sha256"]:
                changed.append(name)
        elif old.get("mtime_ns") != new["mtime_ns"]:
            changed.append(name)
    return changed


def _refuse(what: str, detail: str) -> None:
    raise InputsChanged(f"--resume: {what} changed since the unfinished run ({detail}); rerun on the same inputs, "
                        "or start over with --overwrite")
