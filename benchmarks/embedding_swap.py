"""The token embedding's own perplexity cost: a checkpoint's blocks held fixed, only its (float16) token
table replaced by round-to-nearest variants, and with --side the table untied and rounded on the input
side or the output-head side only.

    python benchmarks/embedding_swap.py CHECKPOINT --data TEXT --variant row8-asym-clip --variant b32-8-sym
    python benchmarks/embedding_swap.py CHECKPOINT --data TEXT --variant row8-asym --side input --side head

Variants are "<row|bN>-<bits>-<sym|asym>[-clip]" (row: one scale per token row; bN: blocks of N values;
-clip: the MSE clipping search, else min-max), or "float16" (the table as stored).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from layerwise.checkpoint import load_compressed
from layerwise.loading import load_tokenizer
from layerwise.pipeline import evaluate_perplexity
from layerwise.solvers import RTNConfig, rtn


def rounded(table: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == "float16":
        return table.clone()
    grouping, bits, kind, *clip = variant.split("-")
    block = None if grouping == "row" else int(grouping.removeprefix("b"))
    config = RTNConfig(bits=int(bits), block_size=block, sym=kind == "sym", mse_clip=bool(clip))
    return rtn(table.half().float(), None, config).compressed.dequantize().float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, help="text file to score")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--side", action="append", choices=("both", "input", "head"),
                        help="where the rounded table is used (default both: the tied table itself)")
    args = parser.parse_args()
    model = load_compressed(args.checkpoint, dtype=torch.float32).model
    tokenizer = load_tokenizer(args.checkpoint)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is not embedding.weight:
        raise SystemExit("the checkpoint's output head is not tied to its embedding")
    table = embedding.weight.data.clone()
    sides = args.side or ["both"]
    if sides != ["both"]:
        head.weight = torch.nn.Parameter(table.clone())  # untied: each side set below
    for variant in args.variant:
        values = rounded(table, variant)
        for side in sides:
            start = time.time()
            embedding.weight.data = values if side in ("both", "input") else table
            if side != "both":
                head.weight.data = values if side == "head" else table
            result = evaluate_perplexity(model, args.data, seqlen=args.seqlen, tokenizer=tokenizer)
            print(json.dumps({"variant": variant, "side": side, **result, "seconds": round(time.time() - start)}),
                  flush=True)


if __name__ == "__main__":
    main()
