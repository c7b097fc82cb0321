"""Where the seconds of one compression go: capture, Hessian collection (staged forwards), solving
(split into prepare_hessian / grid fits / the sweep / the rest), the block forwards that feed the
next block, and the rest; optionally one float forward and the coremltools peer, back to back.

    python benchmarks/profile_compress.py ~/.cache/smollm2-135m --recipe '{"method": "gptq", "bits": 3, "block_size": 32, "sym": true}' \\
        --nsamples 32 --peer ct-gptq-3bit-block32 --forward --threads 1

Times are wall seconds and this process's CPU seconds (the CPU column is less disturbed by other
work on a shared machine). The solver's parts are exclusive: a grid fit inside the sweep counts as
a grid fit, not as sweep. Works on older versions of layerwise too (parts it lacks stay empty).
"""

import argparse
import json
import time
from collections import defaultdict

import torch


class Clock:
    """Exclusive wall and CPU time per label for wrapped functions (nested calls subtract)."""

    def __init__(self):
        self.wall, self.cpu, self.stack = defaultdict(float), defaultdict(float), []

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            self.stack.append([0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                child = self.stack.pop()
                self.wall[label] += wall - child[0]
                self.cpu[label] += cpu - child[1]
                if self.stack:
                    self.stack[-1][0] += wall
                    self.stack[-1][1] += cpu
        return timed

    def patch(self, module, name, label):
        if hasattr(module, name):
            setattr(module, name, self.wrap(label, getattr(module, name)))


def instrument(clock: Clock) -> None:
    import importlib

    import layerwise.compressing as compressing
    import layerwise.engine as engine
    from layerwise.hessian import HessianAccumulator
    from layerwise import methods

    # the modules (the package's attributes of the same names are the solver functions)
    gptq, palettize, rtn, sparsegpt = (importlib.import_module(f"layerwise.solvers.{m}")
                                       for m in ("gptq", "palettize", "rtn", "sparsegpt"))

    clock.patch(engine, "capture_block_inputs", "capture (embeddings, block-0 inputs)")
    clock.patch(engine, "collect_hessians", "Hessian collection (staged forwards)")
    clock.patch(engine, "lockstep_block", "block forwards + Hessians (lockstep, one forward per block)")
    clock.patch(engine, "run_block", "block forwards (next block's inputs)")
    clock.patch(compressing, "relative_error", "report (relative error)")
    clock.patch(HessianAccumulator, "add", "Hessian accumulation (XᵀX)")
    for mod in (gptq, sparsegpt, palettize, rtn):
        clock.patch(mod, "prepare_hessian", "solve: prepare_hessian (Cholesky)")
        clock.patch(mod, "fit_grid", "solve: grid fits (MSE clipping)")
        clock.patch(mod, "obs_sweep", "solve: OBS sweep")
        clock.patch(mod, "_fit", "solve: k-means")
        clock.patch(mod, "refine_masked", "solve: SparseGPT refinement")
    clock.patch(methods, "solve_group", "solve: the rest (sweep loop before sweep.py)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--recipe", required=True, help="one method config as JSON")
    ap.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--peer", help="a layerwise.bench.peers.PEERS name, run right after ours")
    ap.add_argument("--forward", action="store_true", help="also time one float forward over the windows")
    ap.add_argument("--no-stack", action="store_true")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--threads", type=int, help="torch threads for ours and the peer alike (1: stable timings on a busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from layerwise.calib_data import calibration_windows
    from layerwise.engine import LayerwiseCompressor
    from layerwise.loading import load_model, load_tokenizer
    from layerwise.recipe import Recipe, method_config

    tokenizer = load_tokenizer(args.model)
    windows, _ = calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, 0)
    recipe = Recipe.single(method_config(json.loads(args.recipe), "profile"))
    clock = Clock()
    instrument(clock)
    model = load_model(args.model)
    extra = {"stack": False} if args.no_stack else {}
    t0, c0 = time.perf_counter(), time.process_time()
    data = windows if any(c.needs_hessian for c in [recipe.rules[0].config]) else None
    LayerwiseCompressor(model, recipe, device="cpu", **extra).compress(data)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"recipe": args.recipe, "nsamples": args.nsamples, "total_s": total, "total_cpu_s": total_cpu,
           "parts": {k: [clock.wall[k], clock.cpu[k]] for k in clock.wall}}
    out["parts"]["other"] = [total - sum(clock.wall.values()), total_cpu - sum(clock.cpu.values())]
    del model
    if args.forward:
        from layerwise.bench.measure import time_forward

        c0 = time.perf_counter(), time.process_time()
        out["forward_s"] = time_forward(load_model(args.model, dtype="float32"), windows)
        out["forward_cpu_s"] = time.process_time() - c0[1]
    if args.peer:
        from layerwise.bench.peers import PEERS, _import_coremltools, compress_peer

        _import_coremltools()
        model = load_model(args.model, dtype="float32")
        t0, c0 = time.perf_counter(), time.process_time()
        compress_peer(PEERS[args.peer], model, windows)
        out["peer"], out["peer_s"], out["peer_cpu_s"] = args.peer, time.perf_counter() - t0, time.process_time() - c0
    print("| part | wall s | CPU s | share of CPU |\n|---|---|---|---|")
    for k, (w, c) in sorted(out["parts"].items(), key=lambda kv: -kv[1][1]):
        print(f"| {k} | {w:.1f} | {c:.1f} | {100 * c / max(total_cpu, 1e-9):.0f} % |")
    print(f"| **total** | {total:.1f} | {total_cpu:.1f} | |")
    for key in ("forward", "peer"):
        if f"{key}_s" in out:
            print(f"{key}: {out[f'{key}_s']:.1f} s wall, {out[f'{key}_cpu_s']:.1f} s CPU; ours/{key} wall "
                  f"{total / out[f'{key}_s']:.2f}, CPU {total_cpu / out[f'{key}_cpu_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
