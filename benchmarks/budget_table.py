"""The size budget's measured table for `budget_curve.py --table`, in parts that run side by side.

On a shared machine one process measuring a 30-block model can take longer than its slots of CPU
allow; parts of blocks (each one torch thread, forwarding through the earlier blocks without
solving them) and the loss scales run as separate processes, then join into the same table one
pass would give (each layer's candidates depend only on its own block's Hessians of the
uncompressed model).

    python benchmarks/budget_table.py part --model M --blocks 0:15 --out P0.pt
    python benchmarks/budget_table.py part --model M --blocks 15:30 --out P1.pt
    python benchmarks/budget_table.py scales --model M --out S.pt
    python benchmarks/budget_table.py join P0.pt P1.pt S.pt --out TABLE.pt
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from layerwise.budget.loss_scale import output_fisher_scales
from layerwise.budget.measure import measure_candidates
from layerwise.budget.menu import default_menu, layer_menus
from layerwise.calib_data import calibration_windows
from layerwise.loading import load_model, load_tokenizer
from layerwise.models.families import get_module, resolve_family
from layerwise.recipe import Recipe, Rule


def first_blocks(model, n: int) -> None:
    """Keep the model's first n blocks (in place)."""
    blocks = resolve_family(model).blocks
    parent, _, attr = blocks.rpartition(".")
    setattr(get_module(model, parent), attr, torch.nn.ModuleList(list(get_module(model, blocks))[:n]))
    model.config.num_hidden_layers = n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", choices=["part", "scales", "join"])
    p.add_argument("inputs", nargs="*", help="join: the parts and the scales")
    p.add_argument("--model", default="../shared/models/wt2-llama-4l")
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--scale-windows", type=int, default=16)
    p.add_argument("--blocks", default="0:0", help="part: first:end block indices")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.job == "join":
        parts = [torch.load(path, weights_only=False) for path in args.inputs]
        table = {name: cands for part in parts for name, cands in part.get("table", {}).items()}
        scales = next(part["scales"] for part in parts if "scales" in part)
        seconds = sum(part["seconds"] for part in parts)
        torch.save({"table": table, "scales": scales, "measure_s": seconds}, args.out)
        print(f"{len(table)} layers, {sum(len(c) for c in table.values())} candidates, {seconds:.0f} s in all")
        return
    model = load_model(args.model)
    windows, _ = calibration_windows(args.calib, load_tokenizer(args.model), args.nsamples, args.seqlen, 0)
    menu = default_menu({"method": "gptq"})
    t0 = time.perf_counter()
    if args.job == "scales":
        names = list(layer_menus(model, Recipe((Rule(".*", None, menu),))))
        result = {"scales": output_fisher_scales(model, names, windows[: args.scale_windows], device="cpu")}
    else:
        first, end = map(int, args.blocks.split(":"))
        first_blocks(model, end)  # the blocks after the part would only be forwarded
        prefix = re.escape(resolve_family(model).blocks)
        rule = Rule(rf"^{prefix}\.({'|'.join(map(str, range(first, end)))})\.", None, menu)
        result = {"table": measure_candidates(model, layer_menus(model, Recipe((rule,))), windows, device="cpu")}
    result["seconds"] = time.perf_counter() - t0
    torch.save(result, args.out)
    print(f"{args.job} {args.blocks if args.job == 'part' else ''} took {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
