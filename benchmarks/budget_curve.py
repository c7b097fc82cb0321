"""Δppl against bits per weight: ours-mixed (`--target-bits`) vs ours-uniform (GPTQ) vs RTN-uniform.

One measured table (every default-menu candidate of every layer, and the loss scales) serves every
mixed point; each mixed point targets the bits per weight of a uniform GPTQ point, so the two are
compared at the same size. Every point compresses the model in memory (the engine's streaming
order) and measures perplexity on the same evaluation windows. Writes the section `budget-<tag>`
of RESULTS.md and budget-<tag>.{json,png} next to it.

    python benchmarks/budget_curve.py --model ../shared/models/wt2-llama-4l --tag ref
    python benchmarks/budget_curve.py --model ~/.cache/smollm2-135m --tag smollm2 --nsamples 32 --eval-windows 32
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import sys
import time
from pathlib import Path

import torch

from layerwise.bench.results import update_results
from layerwise.budget import Target, menu_recipe
from layerwise.budget.allocate import allocate_from_table
from layerwise.budget.loss_scale import output_fisher_scales
from layerwise.budget.measure import measure_candidates
from layerwise.budget.menu import layer_menus
from layerwise.calib_data import calibration_windows, load_text, tokenize_text
from layerwise.engine import LayerwiseCompressor
from layerwise.evaluate import perplexity
from layerwise.loading import load_model, load_tokenizer
from layerwise.recipe import Recipe, recipe_from_dict

# bits, block (None: per-channel); the acceptance point (3-bit blocks of 32) first, then the ends of
# the 2.5–4.5 bits-per-weight range, then the points between
UNIFORM = [(3, 32), (2, 32), (4, 32), (4, None), (3, None), (3, 128), (4, 128)]


def uniform_recipe(model, method: str, bits: int, block: int | None) -> Recipe:
    """One config for every block linear; blocks of 128 fall back to 64 / 32 where they do not divide."""
    rules = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            size = block if block is None else next(b for b in (block, 64, 32) if module.in_features % b == 0)
            rules.append({"match": f"^{name}$", "config": {"method": method, "bits": bits, "block_size": size}})
    return recipe_from_dict({"rules": rules})


def run_point(model, recipe, windows, eval_ids, args) -> dict:
    work = copy.deepcopy(model)
    t0 = time.perf_counter()
    result = LayerwiseCompressor(work, recipe, device="cpu").compress(windows)
    seconds = time.perf_counter() - t0
    numel = sum(work.get_submodule(r.name).weight.numel() for r in result.layers)
    bpw = sum(r.bits_per_weight * work.get_submodule(r.name).weight.numel() for r in result.layers) / numel
    ppl = perplexity(work.float(), eval_ids, seqlen=args.seqlen, batch_size=8)["ppl"]
    return {"bits_per_weight": bpw, "ppl": ppl, "compress_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/wt2-llama-4l")
    p.add_argument("--tag", default="ref")
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--eval", dest="eval_text", default="../shared/data/wikitext-2/test.txt")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=0, help="first N windows of the evaluation text (0: all)")
    p.add_argument("--scale-windows", type=int, default=16)
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    p.add_argument("--table", help="cache of the measured candidates and loss scales (torch.save): read when it "
                   "exists, else written, so a rerun with another allocation skips the measuring")
    p.add_argument("--render-only", action="store_true", help="rewrite the section and plot from budget-<tag>.json")
    p.add_argument("--points", type=int, default=len(UNIFORM), help="how many uniform settings (in UNIFORM's order)")
    p.add_argument("--point", type=int, action="append", help="only this uniform setting (its index in UNIFORM; "
                   "repeatable), e.g. for runs side by side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--curves", default=",".join(CURVES), help="which curves this run computes (comma-separated: "
                   "two runs with different curves may share the work; rows are merged into budget-<tag>.json)")
    args = p.parse_args()
    json_path = Path(args.results).parent / f"budget-{args.tag}.json"
    if args.render_only:
        publish(json.loads(json_path.read_text()), args)
        return
    curves = args.curves.split(",")
    if not set(curves) <= set(CURVES):
        p.error(f"--curves: a subset of {','.join(CURVES)}")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    windows, _ = calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, 0)
    eval_ids = tokenize_text(tokenizer, load_text(args.eval_text, "evaluation"))
    if args.eval_windows:
        eval_ids = eval_ids[: args.eval_windows * args.seqlen]
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)
    data = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_tokens": int(eval_ids.numel()),
            "command": "python " + " ".join(sys.argv)}
    data["fp16_ppl"] = earlier_fp16(json_path, data) or perplexity(
        copy.deepcopy(model).float(), eval_ids, seqlen=args.seqlen, batch_size=8)["ppl"]
    log(f"float16 ppl {data['fp16_ppl']:.3f}")
    table, scales, data["measure_s"] = measured(model, windows, args) if "gptq-mixed" in curves else (None, None, None)
    if table is not None:
        log(f"measured {sum(len(v) for v in table.values())} candidates in {data['measure_s']:.0f} s")
    done = set()  # rows an earlier run with these settings published: not computed again
    if earlier_fp16(json_path, data):
        done = {(r["curve"], r["settings"]) for r in json.loads(json_path.read_text())["rows"]}
    for bits, block in [UNIFORM[i] for i in args.point] if args.point else UNIFORM[: args.points]:  # the acceptance point first: each row is published as it lands
        settings = f"{bits}-bit {'per-channel' if block is None else f'block {block}'}"
        rows, target = [], table_bits(model, table, bits, block) if table is not None else None
        # the mixed point from the table's bytes when it has them, else after a uniform row (its bits)
        for curve in curves if target is not None else sorted(curves, key=lambda c: c == "gptq-mixed"):
            if curve == "gptq-mixed":
                if target is None:
                    log(f"{settings}: no uniform row and not every layer has it in the table; mixed point skipped")
                    continue
                if (curve, f"target {target:.3f}") in done:
                    continue
                allocation = allocate_from_table(model, table, scales, Target(bits=target))
                row = {"curve": curve, "settings": f"target {target:.3f}",
                       **run_point(model, allocation.recipe, windows, eval_ids, args),
                       "predicted_dloss": allocation.predicted_dloss, "mix": mix_of(allocation, table)}
            elif (curve, settings) in done:
                continue
            else:  # both uniform curves store the same grids: the same bits per weight
                method = curve.split("-")[0]
                row = {"curve": curve, "settings": settings,
                       **run_point(model, uniform_recipe(model, method, bits, block), windows, eval_ids, args)}
                target = target or row["bits_per_weight"]
            rows.append(row)
            log(row)
        if rows:
            merge_and_publish(json_path, data, rows, args)


CURVES = ("gptq-uniform", "gptq-mixed", "rtn-uniform")


def table_bits(model, table: dict, bits: int, block: int | None) -> float | None:
    """Bits per weight of the uniform setting from the measured bytes (exactly the uniform
    checkpoint's), or None where some layer's menu lacks it (blocks of 128 that fall back to 64)."""
    total = 0
    for name, cands in table.items():
        match = [c for c in cands if c.config.bits == bits and c.config.block_size == block]
        if not match:
            return None
        total += match[0].checkpoint_bytes
    return 8 * total / sum(model.get_submodule(n).weight.numel() for n in table)


def earlier_fp16(json_path: Path, data: dict) -> float | None:
    """The float16 perplexity of an earlier run on the same model and evaluation tokens."""
    if not json_path.exists():
        return None
    old = json.loads(json_path.read_text())
    same = all(old.get(k) == data[k] for k in ("nsamples", "seqlen", "eval_tokens")) and \
        old.get("model") == data["model"].replace(str(Path.home()), "~")
    return old.get("fp16_ppl") if same else None


def merge_and_publish(json_path: Path, data: dict, rows: list[dict], args) -> None:
    """Add `rows` to budget-<tag>.json (replacing rows of the same curve and settings), under a lock:
    runs sharing the curves publish into one section."""
    with open(json_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = json.loads(json_path.read_text()) if earlier_fp16(json_path, data) else {**data, "rows": []}
        if data["measure_s"] is not None:
            merged["measure_s"] = data["measure_s"]
        command = data["command"].replace(str(Path.home()), "~")
        if command not in merged["command"].replace(str(Path.home()), "~").split(" and "):
            merged["command"] += " and " + command
        new = {(r["curve"], r["settings"]) for r in rows}
        merged["rows"] = [r for r in merged["rows"] if (r["curve"], r["settings"]) not in new] + rows
        publish(merged, args)


def measured(model, windows, args) -> tuple[dict, dict, float]:
    """(table, scales, seconds it took to measure them), from --table when it holds them."""
    if args.table and Path(args.table).exists():
        cached = torch.load(args.table, weights_only=False)
        return cached["table"], cached["scales"], cached["measure_s"]
    t0 = time.perf_counter()
    menus = layer_menus(model, menu_recipe({"method": "gptq"}))
    table = measure_candidates(model, menus, windows, device="cpu")
    scales = output_fisher_scales(model, list(menus), windows[: args.scale_windows], device="cpu")
    measure_s = time.perf_counter() - t0
    if args.table:
        torch.save({"table": table, "scales": scales, "measure_s": measure_s}, args.table)
    return table, scales, measure_s


def mix_of(allocation, table) -> dict:
    """{"3b32": layers, …}: how many layers took each config."""
    mix = {}
    for name, k in allocation.chosen.items():
        c = table[name][k].config
        key = f"{c.bits}b{'pc' if c.block_size is None else c.block_size}"
        mix[key] = mix.get(key, 0) + 1
    return mix


def publish(data: dict, args) -> None:
    for key in ("command", "model"):  # no machine paths in the committed files
        data[key] = data[key].replace(str(Path.home()), "~")
    for r in data["rows"]:
        r["dppl"] = r["ppl"] - data["fp16_ppl"]
    out_dir = Path(args.results).parent
    (out_dir / f"budget-{args.tag}.json").write_text(json.dumps(data, indent=1))
    plot(data, out_dir / f"budget-{args.tag}.png")
    update_results(Path(args.results), f"budget-{args.tag}", render(data, f"budget-{args.tag}.png"))


def render(data: dict, png: str) -> str:
    lines = [
        f"## Size budget: mixed vs uniform bits ({Path(data['model']).name})", "",
        "Reproduce: " + " and ".join(f"`{c}`" for c in data["command"].split(" and ")), "",
        f"Model `{data['model']}`; calibration {data['nsamples']} × {data['seqlen']}-token windows of WikiText-2 valid "
        f"(seed 0); perplexity on the first {data['eval_tokens']:,} tokens of WikiText-2 test in {data['seqlen']}-token "
        f"windows (float16 {data['fp16_ppl']:.3f}). Mixed = `--target-bits` at each uniform GPTQ point's bits per weight, "
        f"default menu (GPTQ 2/3/4/8 bits × per-channel / 128 / 32); measuring every candidate and the loss scales "
        + (f"once took {data['measure_s']:.0f} s (shared 2-core machine)." if data.get("measure_s") else "not timed yet."), "",
        "Predicted Δppl = float16 ppl × (exp(predicted Δloss) − 1), the knapsack's own estimate of the mean "
        "next-token loss it adds; real / predicted within [0.67, 1.5] is the predictor's acceptance (issue 25).", "",
        "| curve | settings | bits/weight | ppl | Δppl | predicted Δppl (real / predicted) | mixed / uniform Δppl "
        "| compress s | mix (layers per config) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    uniform = {round(r["bits_per_weight"], 3): r for r in data["rows"] if r["curve"] == "gptq-uniform"}
    for r in sorted(data["rows"], key=lambda r: (r["bits_per_weight"], r["curve"])):
        ratio = ""
        if r["curve"] == "gptq-mixed" and uniform:
            ref = min(uniform.values(), key=lambda u: abs(u["bits_per_weight"] - r["bits_per_weight"]))
            ratio = f"{r['dppl'] / ref['dppl']:.2f}" if ref["dppl"] > 0 else "–"
        mix = ", ".join(f"{k}×{v}" for k, v in sorted(r.get("mix", {}).items()))
        lines.append(f"| {r['curve']} | {r['settings']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['dppl']:+.3f} | "
                     f"{predicted(r, data['fp16_ppl'])} | {ratio} | {r['compress_s']:.1f} | {mix} |")
    lines += ["", f"![Δppl vs bits per weight]({png})"]
    return "\n".join(lines)


def predicted(row: dict, fp16_ppl: float) -> str:
    """The knapsack's predicted Δppl of a mixed row and how the real one compares ("" for the others)."""
    if row.get("predicted_dloss") is None:
        return ""
    guess = fp16_ppl * math.expm1(row["predicted_dloss"])
    return f"{guess:+.3f} ({row['dppl'] / guess:.2f})" if guess > 0 else f"{guess:+.3f}"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for curve, style in (("rtn-uniform", "s:"), ("gptq-uniform", "o--"), ("gptq-mixed", "D-")):
        pts = sorted((r["bits_per_weight"], r["dppl"]) for r in data["rows"] if r["curve"] == curve)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=curve)
    ax.set_xlabel("bits per weight (every stored byte)")
    ax.set_ylabel("Δ perplexity vs float16")
    ax.set_yscale("log")
    ax.set_title(Path(data["model"]).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
