"""The size budget's measuring pass (every default-menu candidate of every layer) before and after a
change: CPU seconds on the first blocks of a model, one torch thread, the two checkouts alternated
in fresh processes, and whether they measured the same candidates (errors bit for bit).

    git archive 4609e01 layerwise | tar -x -C OLD_CHECKOUT        # the code before (any empty folder)
    python benchmarks/budget_measure_speed.py OLD_CHECKOUT . --model ~/.cache/smollm2-135m --blocks 2

Writes the section `budget-measure-speed` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args) -> None:
    """In a fresh process whose PYTHONPATH picks the checkout: measure, save the table, print seconds."""
    torch.set_num_threads(1)
    import layerwise
    from layerwise.budget import menu_recipe
    from layerwise.budget.measure import measure_candidates
    from layerwise.budget.menu import layer_menus
    from layerwise.calib_data import calibration_windows
    from layerwise.loading import load_model, load_tokenizer
    from layerwise.models.families import get_module, resolve_family

    model = load_model(args.model)
    blocks = resolve_family(model).blocks
    parent, _, attr = blocks.rpartition(".")
    setattr(get_module(model, parent), attr, torch.nn.ModuleList(list(get_module(model, blocks))[: args.blocks]))
    model.config.num_hidden_layers = args.blocks
    windows, _ = calibration_windows(args.calib, load_tokenizer(args.model), args.nsamples, args.seqlen, 0)
    menus = layer_menus(model, menu_recipe({"method": "gptq"}))
    cpu = time.process_time()
    table = measure_candidates(model, menus, windows, device="cpu")
    cpu = time.process_time() - cpu
    torch.save({n: [(c.row_errors, c.checkpoint_bytes, c.export_bytes) for c in cands] for n, cands in table.items()},
               args.out)
    print(json.dumps({"cpu_s": cpu, "code": str(Path(layerwise.__file__).parent.parent)}))


def run(checkout: str, args, out: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
    cmd = [sys.executable, __file__, "--worker", "--out", out, "--model", args.model, "--blocks", str(args.blocks),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib", args.calib]
    line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(line)["cpu_s"]


def same_tables(a: str, b: str) -> bool:
    ta, tb = torch.load(a), torch.load(b)
    return ta.keys() == tb.keys() and all(
        len(ta[n]) == len(tb[n]) and all(torch.equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(ta[n], tb[n]))
        for n in ta
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", nargs="?")
    p.add_argument("after", nargs="?")
    p.add_argument("--model", default="../shared/models/wt2-llama-4l")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from layerwise.bench.results import update_results

    times = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for which in ("before", "after"):
                times[which].append(run(getattr(args, which), args, f"{tmp}/{which}.pt"))
                print(which, f"{times[which][-1]:.1f} CPU s", flush=True)
        same = same_tables(f"{tmp}/before.pt", f"{tmp}/after.pt")
    before, after = min(times["before"]), min(times["after"])
    command = "python " + " ".join(sys.argv).replace(str(Path.home()), "~")
    update_results(Path(args.results), "budget-measure-speed", "\n".join([
        "## Size budget: the measuring pass, before and after", "",
        f"Reproduce: `{command}` (the first checkout holds the code before: `git archive COMMIT layerwise | tar -x -C DIR`)", "",
        f"Every default-menu candidate (GPTQ 2/3/4/8 bits × per-channel / 128 / 32) of every linear of the first "
        f"{args.blocks} blocks of `{args.model.replace(str(Path.home()), '~')}`, {args.nsamples} × {args.seqlen} "
        f"calibration windows, one torch thread, CPU seconds of `measure_candidates` (least of {args.rounds} "
        "alternated runs, each in a fresh process; shared 2-core machine).", "",
        "| code | CPU s | ratio |", "|---|---|---|",
        f"| before | {before:.1f} | 1.00 |",
        f"| after | {after:.1f} | {after / before:.2f} |", "",
        f"Same candidates (every row error bit for bit, every byte count): {same}.",
    ]))
    print(f"after / before {after / before:.2f}; same tables: {same}")


if __name__ == "__main__":
    main()
