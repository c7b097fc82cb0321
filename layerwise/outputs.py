"""Where outputs may go, and how they get there: the overwrite policy and the atomic-output helper.

Every directory this tool writes (checkpoint, decompressed model, mlpackage, its tokenizer folder)
is built under a hidden temporary name next to the target and renamed into place only when
complete. `--overwrite` replaces only something layerwise wrote (a `MARKER` file inside it, or a
layerwise manifest, or an mlpackage whose metadata layerwise wrote), only after the new output is
complete, and never a path that is, contains or lies inside one of the command's inputs.

Everything temporary a command makes for an output lives in one hidden sibling named by
`temporary_path` (`.NAME.partial-PID`, `.NAME.old-PID`): removed when the command ends, however it
ends short of SIGKILL, and after a SIGKILL by the next command writing NAME (`remove_stale`, once
the owning process is gone).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

MARKER = ".layerwise-output"  # JSON {"written_by": "layerwise", "kind": ...} in every directory we make


def check_output(out: str | Path, overwrite: bool, inputs: tuple = (), flag: str = "--out") -> Path:
    """Refuse an output path that would destroy something; returns it as a Path.

    inputs: paths the command reads (model dir, checkpoint, calibration file/dir, recipe); names
    that are not local paths (a Hub id, "wikitext2") are ignored.
    """
    out = Path(out)
    target = _resolved(out)
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = _resolved(Path(given))
        if target == source or source in target.parents or target in source.parents:
            relation = "is" if target == source else "lies inside" if source in target.parents else "contains"
            raise OutputError(f"{flag} {out} {relation} the input {given}; choose an output path outside every input")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(f"{flag} {out} already exists; choose another path or pass --overwrite")
        if not written_by_layerwise(out):
            raise OutputError(
                f"{flag} {out} exists and was not written by layerwise; --overwrite only replaces layerwise's own "
                "outputs, so remove it yourself or choose another path"
            )
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {out}: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: cannot write in {parent} (permission denied or read-only); choose another path")
    return out


def written_by_layerwise(path: Path) -> bool:
    """Whether `path` is a directory this tool made (a marker, a manifest, or our mlpackage metadata)
    or a GGUF file it wrote (its layerwise.* metadata)."""
    if path.suffix == ".gguf" and path.is_file() and not path.is_symlink():
        return _gguf_is_ours(path)
    if path.is_symlink() or not path.is_dir():
        return False
    marker = path / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("written_by") == "layerwise"
        except (OSError, ValueError, AttributeError):
            return False
    if (path / "layerwise.json").is_file():  # a checkpoint written before the marker existed
        return True
    return path.suffix == ".mlpackage" and _mlpackage_is_ours(path)


def _gguf_is_ours(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return "layerwise.source_model" in GGUFReader(path).fields
    except Exception:  # not a readable GGUF file (or no gguf package): not ours to replace
        return False


def _mlpackage_is_ours(path: Path) -> bool:
    spec = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    try:
        from coremltools.proto import Model_pb2

        model = Model_pb2.Model()
        model.ParseFromString(spec.read_bytes())
    except Exception:  # not a readable package: not ours to replace
        return False
    return "layerwise.context" in model.description.metadata.userDefined


def mark(directory: Path, kind: str) -> None:
    """Leave the marker that lets a later --overwrite recognise this directory as ours."""
    (directory / MARKER).write_text(json.dumps({"written_by": "layerwise", "kind": kind}) + "\n")


def remove_stale(out: Path) -> None:
    """Remove hidden `.NAME.partial-PID` / `.NAME.old-PID` siblings left by a killed run (SIGKILL, power
    loss) whose process is gone; a live process's temporary directory is left alone."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        tag, _, pid = path.name[len(out.name) + 2 :].rpartition("-")
        if tag in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an earlier run that was killed", path)
            remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temporary_path(out: Path, tag: str = "partial") -> Path:
    """The hidden sibling an output is built in (same file system, so the final rename is atomic)."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}"


def publish(tmp: Path, out: Path, kind: str | None = None) -> Path:
    """Mark the finished `tmp` (unless kind is None) and move it to `out`, replacing an old output of
    ours only now that the new one is complete."""
    if kind is not None:
        mark(tmp, kind)
    for path in (tmp, *tmp.rglob("*")) if tmp.is_dir() else (tmp,):
        if path.is_file():  # safetensors writes 0600; a team's checkpoint must be readable by the team
            follow_umask(path)
    with os_errors(out):
        if out.exists() or out.is_symlink():
            old = temporary_path(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            remove(old)
        else:
            os.replace(tmp, out)
    return out


@contextlib.contextmanager
def atomic_directory(out: str | Path, kind: str, overwrite: bool, inputs: tuple = (), flag: str = "--out"):
    """Yield a fresh temporary directory; on success it becomes `out` (marked as ours), on any error
    or interrupt it is removed. The policy of `check_output` applies."""
    out = check_output(out, overwrite, inputs, flag)
    remove_stale(out)
    tmp = temporary_path(out)
    with os_errors(out):
        remove(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with os_errors(out):
            tmp.mkdir()
            yield tmp
        publish(tmp, out, kind)
    finally:
        remove(tmp)


@contextlib.contextmanager
def scratch_directory(out: Path):
    """Yield a fresh `temporary_path(out)` directory, which is also this process's temporary
    directory meanwhile (`tempfile` and TMPDIR: what libraries write there, coremltools' whole
    temporary packages among them, lands beside `out` under its name); removed at the end."""
    remove_stale(out)
    scratch = temporary_path(out)
    with os_errors(out):
        remove(scratch)
        (scratch / "tmp").mkdir(parents=True)
    try:
        with temporary_files_in(scratch / "tmp"):
            yield scratch
    finally:
        remove(scratch)


@contextlib.contextmanager
def temporary_files_in(directory: Path):
    """Point `tempfile` (and TMPDIR, for native code and child processes) at `directory`, then
    restore both; process-wide, like every use of the temporary directory."""
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


_ENVIRONMENT = {  # errno → (what happened, what to do)
    errno.ENOSPC: ("the disk is full", "free some space or choose another --out"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose another --out"),
    errno.EROFS: ("the file system is read-only", "choose a writable --out"),
    errno.EACCES: ("permission denied", "choose a writable --out"),
    errno.EPERM: ("permission denied", "choose a writable --out"),
    errno.ENOTDIR: ("a parent is a file, not a directory", "choose another --out"),
}
_WRITING = {
    errno.ENOENT: ("its folder vanished or cannot hold files", "choose another --out"),
    errno.EINVAL: ("the file system refused the name or the operation", "choose another --out"),
    errno.EIO: ("an input/output error on the disk", "check the disk or choose another --out"),
}


def environment_failure(exc: BaseException, out, writing: bool = True) -> OutputError | None:
    """The one-line OutputError for a failed write (disk full, read-only, permission, parent is a
    file), or None when `exc` is something else. writing: `exc` came from writing `out`, so a
    missing or unusable directory is the environment's doing too."""
    known = _ENVIRONMENT if not writing else {**_ENVIRONMENT, **_WRITING}
    if not isinstance(exc, OSError) or isinstance(exc, OutputError) or exc.errno not in known:
        return None
    problem, fix = known[exc.errno]
    if not writing:  # raised somewhere in a command: it may have been a read
        return OutputError(f"{problem}: {exc.filename or out}; check that path, or {fix}")
    return OutputError(f"cannot write {out}: {problem} ({exc.filename or out}); {fix}")


@contextlib.contextmanager
def os_errors(out: Path):
    """Turn a failed write into one OutputError line (see `environment_failure`)."""
    try:
        yield
    except OSError as e:
        failure = environment_failure(e, out)
        if failure is None:
            raise
        raise failure from None


def follow_umask(path: Path) -> None:
    """Give a file the mode `open()` would have: 0666 minus the umask (some writers create 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))
