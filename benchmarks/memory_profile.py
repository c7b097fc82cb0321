"""Where the peak resident memory of one `compress` is reached: the peak (VmHWM) inside each of a
few wrapped functions of the engine and the solvers, and per block, from one in-process run.

    python benchmarks/memory_profile.py [--blocks K] -- compress MODEL --out DIR --method gptq … (CLI arguments)
    python benchmarks/memory_profile.py -- export CKPT --out PKG --context 512   (export's phases)

Linux only: the peak is reset before each wrapped call (`/proc/self/clear_refs`) and read after it
(`/proc/self/status`), carried up to the enclosing calls, so nesting is measured right. `--blocks K`
stops the run (as Ctrl-C would, resumable) once K blocks are written. MiB = 2^20 bytes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import defaultdict

WRAPPED = [  # (module, attribute, label)
    ("layerwise.engine", "capture_block_inputs", "capture"),
    ("layerwise.engine", "collect_hessians", "Hessian collection (staged)"),
    ("layerwise.engine", "lockstep_block", "lockstep block"),
    ("layerwise.engine", "run_block", "block forward"),
    ("layerwise.compressing", "relative_error", "report: relative_error"),
    ("layerwise.compressing", "report_denominator", "report: tr(W H Wᵀ)"),
    ("layerwise.compressing", "put_dense", "put dense weights"),
    ("layerwise.solvers.gptq", "prepare_hessian", "gptq: prepare_hessian"),
    ("layerwise.solvers.gptq", "obs_sweep_transposed", "gptq: sweep"),
    ("layerwise.solvers.gptq", "_transposed_in_sweep_order", "gptq: Wᵀ and static grids"),
    ("layerwise.solvers.gptq", "_undamped_row_errors", "gptq: row errors"),
    ("layerwise.export", "load_checkpoint", "export: load"),  # `-- export CKPT --out PKG`: its phases
    ("layerwise.coreml.convert", "_trace", "export: trace"),
    ("layerwise.coreml.convert", "_convert", "export: convert"),
    ("layerwise.coreml.weights", "swap_stand_ins", "export: swap"),
    ("layerwise.coreml.convert", "_save", "export: save"),
]


def status(field: str) -> int:
    """A /proc/self/status field in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def resident_by_kind() -> str:
    """Resident MiB of the process's mappings by kind (heap, anonymous, files), from /proc/self/smaps."""
    kinds = defaultdict(int)
    kind = "anonymous"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
                path = head[5] if len(head) > 5 else ""
                kind = "heap" if path == "[heap]" else ("anonymous" if not path or path.startswith("[") else "files")
            elif head[0] == "Rss:":
                kinds[kind] += int(head[1])
    return ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(kinds.items()))


def large_tensors(min_mib: float = 8) -> str:
    """The live tensors (found through the garbage collector) of at least `min_mib`, one per storage."""
    import gc

    import torch

    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.untyped_storage().nbytes():
                st = obj.untyped_storage()
                seen.setdefault(st.data_ptr(), (st.nbytes(), f"{tuple(obj.shape)} {str(obj.dtype)[6:]}"))
        except Exception:  # tensors without storage (meta, sparse)
            pass
    big = sorted((v for v in seen.values() if v[0] >= min_mib * 2**20), reverse=True)
    return f"{sum(n for n, _ in seen.values()) / 2**20:.0f} MiB in tensors; " + ", ".join(
        f"{n / 2**20:.0f} {what}" for n, what in big)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Peaks:
    def __init__(self, dump: str | None = None):
        self.dump = dump  # a label at whose calls the resident set is broken down by kind
        self.peak = defaultdict(int)  # label -> KiB
        self.calls = defaultdict(int)
        self.entry = defaultdict(int)  # label -> the largest resident set at a call's start (KiB)
        self.stack: list[int] = []

    def wrap(self, label, fn):
        def measured(*args, **kwargs):
            label_now = label(*args) if callable(label) else label
            if label_now == self.dump:
                print(f"at {label_now}: resident MiB {resident_by_kind()}; {large_tensors()}", file=sys.stderr, flush=True)
            self.entry[label_now] = max(self.entry[label_now], status("VmRSS"))
            if self.stack:
                self.stack[-1] = max(self.stack[-1], status("VmHWM"))
            reset_peak()
            self.stack.append(0)
            try:
                return fn(*args, **kwargs)
            finally:
                p = max(self.stack.pop(), status("VmHWM"))
                self.peak[label_now] = max(self.peak[label_now], p)
                self.calls[label_now] += 1
                if self.stack:
                    self.stack[-1] = max(self.stack[-1], p)
        return measured

    def table(self) -> str:
        rows = [f"{'peak MiB':>9}  {'at start':>8}  {'calls':>5}  where"]
        rows += [f"{kib / 1024:9.0f}  {self.entry[k] / 1024:8.0f}  {self.calls[k]:5d}  {k}" for k, kib in self.peak.items()]
        return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=0, help="stop after this many blocks (0: the whole run)")
    p.add_argument("--dump", help="a label: print the resident set by kind at each of its calls")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="MiB: malloc serves allocations from this size by their own mapping (memory.give_back_large_frees)")
    p.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the layerwise CLI arguments")
    args = p.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli

    if args.mmap_threshold:
        from layerwise.memory import give_back_large_frees

        give_back_large_frees(args.mmap_threshold << 20)
    peaks = Peaks(args.dump)
    for module, name, label in WRAPPED:
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            setattr(mod, name, peaks.wrap(label, getattr(mod, name)))
    from layerwise.engine import BlockWalker

    process = BlockWalker._process_block

    def block(self, index, *rest):
        process(self, index, *rest)
        print(f"block {index}: VmRSS {status('VmRSS') / 1024:.0f} MiB", file=sys.stderr, flush=True)
        if args.blocks and index + 1 >= args.blocks:
            raise KeyboardInterrupt

    BlockWalker._process_block = peaks.wrap(lambda self, index, *rest: f"block {index}", block)
    from layerwise import cli

    try:
        rc = cli.main(cli_args)
    finally:
        print(peaks.table(), flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
