"""The kept shards of an unfinished run, checked against the run record before a resume trusts them.

`.layerwise-run.json` records each shard's sha256 and size when the shard is renamed into place
(`shard_entry`). `kept_blocks` keeps the block shards from block 0 up to the first one that is
missing, truncated, unreadable or altered (one log line naming which and why), and deletes that
one and every later shard, so the engine recomputes from there and the finished checkpoint has the
bytes of an uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .manifest import sha256_file

log = logging.getLogger(__name__)

REST = "rest.safetensors"


def shard_name(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def shard_entry(path: Path) -> dict:
    """What the run record keeps of a shard just written."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def shard_problem(path: Path, recorded: dict | None) -> str | None:
    """Why the kept shard at `path` cannot be trusted, or None when it is as recorded."""
    if not path.is_file():
        return "missing"
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return "not in the run record with a checksum (written by an older version)"
    try:
        size, digest = path.stat().st_size, sha256_file(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size < recorded.get("size", 0):
        return f"truncated ({size} of {recorded['size']} bytes)"
    if digest == recorded["sha256"]:
        return None
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError):
        return "unreadable (not a safetensors file any more)"
    return "altered (sha256 differs from the run record)" + ("" if size == recorded.get("size") else f", {size} bytes")


def kept_blocks(tmp_dir: Path, progress: dict) -> tuple[list[int], dict[str, dict]]:
    """(the trusted block indices from 0 on, their shard entries); deletes every shard after them."""
    recorded = progress.get("shards") or {}
    listed = sorted(i for i in progress.get("blocks", []) if isinstance(i, int))
    blocks: list[int] = []
    for index in listed:
        if index != len(blocks):  # a gap: the engine recomputes from the first block absent
            break
        problem = shard_problem(tmp_dir / shard_name(index), recorded.get(shard_name(index)))
        if problem is not None:
            later = sum(1 for i in listed if i > index)
            log.warning("--resume: kept shard %s is %s; recomputing from block %d%s", shard_name(index), problem, index,
                        f" ({later} later shards discarded)" if later else "")
            break
        blocks.append(index)
    trusted = {shard_name(i) for i in blocks}
    for path in tmp_dir.glob("block-*.safetensors"):
        if path.name not in trusted:
            path.unlink()
    shards = {name: recorded[name] for name in trusted}
    rest = tmp_dir / REST
    if rest.is_file():  # rewritten at the end of every run; kept only while it is what was recorded
        problem = shard_problem(rest, recorded.get(REST))
        if problem is None:
            shards[REST] = recorded[REST]
        else:
            if REST in recorded:
                log.warning("--resume: kept shard %s is %s; it will be written again", REST, problem)
            rest.unlink()
    return blocks, shards
