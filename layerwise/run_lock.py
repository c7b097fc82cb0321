"""One live run per output: an owner file inside the unfinished output `.NAME.partial`.

The owner file (JSON: pid, host, started) is created with O_CREAT|O_EXCL, so of two runs starting
together one gets it; it stays while the run lives and is removed when the run ends, however it
ends short of SIGKILL. A run whose owner file names a live process (this host: the PID answers
`kill(pid, 0)`; another host: always, since its processes cannot be asked) is refused whatever
its flags, so `--overwrite` or `--resume` never delete or mix into a live run's shards. A dead
owner's file is taken over: its partial output stays resumable or removable as before.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import OutputBusy
from .outputs import _alive

OWNER = ".layerwise-owner.json"


def partial_dir(out: Path) -> Path:
    """Where the unfinished output of `out` lives (`checkpoint.CheckpointWriter.tmp_dir`)."""
    return out.parent / f".{out.name}.partial"


def live_owner(tmp_dir: Path) -> dict | None:
    """The owner record of `tmp_dir` when its process may still be running, else None."""
    try:
        owner = json.loads((tmp_dir / OWNER).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # being written this instant, or left half-written by a kill
        try:
            young = time.time() - (tmp_dir / OWNER).stat().st_mtime < 10
        except OSError:
            return None
        return {"pid": "?", "host": "?", "started": "?"} if young else None
    if host != socket.gethostname():
        return owner
    return owner if _alive(pid) else None


def check_unlocked(out: Path) -> None:
    """Raise OutputBusy when a live run owns `out`'s unfinished output."""
    tmp_dir = partial_dir(out)
    owner = live_owner(tmp_dir)
    if owner is None:
        return
    where = "on this host" if owner.get("host") == socket.gethostname() else f"on host {owner.get('host')}"
    raise OutputBusy(
        f"--out {out} is being written by another run (PID {owner.get('pid')} {where}, started {owner.get('started')}; "
        f"owner file {tmp_dir / OWNER}); wait for it to end or stop it, then run again (if no such run is alive, "
        "delete that owner file)"
    )


class RunLock:
    """The owner file of this process in `tmp_dir` (created by `acquire`, removed by `release`)."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp_dir = partial_dir(out)
        self.held = False

    def acquire(self) -> None:
        """Create the owner file atomically; a dead owner's is replaced, a live one's refused."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            check_unlocked(self.out)
            (self.tmp_dir / OWNER).unlink(missing_ok=True)  # the dead owner's
            try:
                fd = os.open(self.tmp_dir / OWNER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # another run took it between the check and now
                continue
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            self.held = True
            return
        check_unlocked(self.out)

    def release(self) -> None:
        """Remove the owner file if it is still this process's (it moves with a published output)."""
        if not self.held:
            return
        self.held = False
        path = self.tmp_dir / OWNER
        try:
            if int(json.loads(path.read_text())["pid"]) == os.getpid():
                path.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            pass
