"""Measuring grid rows: each row runs in a fresh subprocess, so its peak RSS is its own.

Within a row: load the model, cut the calibration windows, compress (timed: no load, no evaluation),
read the peak RSS, time one plain float32 forward over the same calibration windows (the ratio's
denominator, same process), then evaluate perplexity. A failing row keeps its error.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from layerwise.calib_data import bos_token_id

from .grids import settings_label
from .measure import add_forward_ratios, evaluation_ids, gpu_peak_mb, peak_rss_mb, timed_forward
from .peers import measure_peer

log = logging.getLogger(__name__)


def run_row(cfg: dict | None, model: str, calib: str, eval_text: str, nsamples: int, seqlen: int,
            seed: int, device: str, eval_tokens: int | None = None, threads: int | None = None) -> dict:
    """One grid row in a fresh process (`threads` torch threads, default torch's); returns its
    measurements (or the error)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_row_worker, (cfg, model, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens, threads))


def _row_worker(cfg, model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens=None, threads=None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if cfg is not None and cfg.get("peer"):  # a coremltools row: keeps its own error, like ours
        row = measure_peer(cfg["method"], model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens)
        return {**row, "threads": torch.get_num_threads()}
    row = {"method": "float16" if cfg is None else cfg["method"], "settings": settings_label(cfg), "peer": False,
           "threads": torch.get_num_threads()}
    try:
        row.update(_measure(cfg, model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens))
    except Exception as e:  # a failing configuration keeps its row, with the error
        row["error"] = f"{type(e).__name__}: {e}"
        log.error("row %s failed:\n%s", row["settings"], traceback.format_exc())
    return row


def _measure(cfg, model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens=None) -> dict:
    from layerwise.calib_data import calibration_windows
    from layerwise.checkpoint import load_compressed
    from layerwise.evaluate import perplexity
    from layerwise.inspect import totals
    from layerwise.job import CompressJob
    from layerwise.loading import load_model, load_tokenizer
    from layerwise.pipeline import compress_to_checkpoint
    from layerwise.recipe import Recipe, method_config, recipe_from_dict

    tokenizer = load_tokenizer(model_path)
    windows, _ = calibration_windows(calib, tokenizer, nsamples, seqlen, seed)
    out: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-"))
    try:
        if cfg is None:
            evaluated = load_model(model_path, dtype="float32")
            out["bits_per_weight"] = 16.0
            out["checkpoint_mb"] = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors")) / 1e6
        else:
            model = load_model(model_path)
            if "rules" in cfg:
                recipe = recipe_from_dict({"rules": cfg["rules"]}, "bench")
            else:
                recipe = Recipe.single(method_config(dict(cfg), "bench"))
            cpu = time.process_time()
            path, result = compress_to_checkpoint(CompressJob(model_path, tmp / "ck", recipe, calib, seed=seed,
                                                              device=device), model=model, tokenizer=tokenizer,
                                                  windows=windows)
            out["compress_cpu_s"] = time.process_time() - cpu
            out["compress_s"] = result.seconds
            out["peak_rss_mb"] = peak_rss_mb()
            out["gpu_peak_mb"] = gpu_peak_mb()
            t = totals(path)
            out["bits_per_weight"] = t["bits_per_weight"]
            out["checkpoint_mb"] = t["safetensors_bytes"] / 1e6
            out["layer_errors"] = {r.name: r.rel_error for r in result.layers}
            del model
            evaluated = load_compressed(path).model
        if cfg is not None and any(rule.config.needs_hessian for rule in recipe.rules):  # calibrated: × forward
            out.update(timed_forward(load_model(model_path, dtype="float32"), windows))
            add_forward_ratios(out)
        res = perplexity(evaluated, evaluation_ids(tokenizer, eval_text, eval_tokens), seqlen=seqlen,
                         bos=bos_token_id(tokenizer))
        out["ppl"] = res["ppl"]
        out["eval_tokens"] = res["tokens"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_grid(rows: list[dict | None], model: str, calib: str, eval_text: str, nsamples=128, seqlen=256, seed=0,
             device="cpu", progress=print, on_row=None, repeat: int = 1, eval_tokens: int | None = None,
             threads: int | None = None, measured: list[dict] | None = None) -> list[dict]:
    """Run every row (`repeat` times, each in a fresh process); `on_row(results so far)` after each
    row, so a long grid leaves partial results. measured: rows an earlier run of this grid wrote
    (its JSON): a row measured with the same recipe and arguments is taken from there, not run again."""
    results = []
    earlier = {r["key"]: r for r in measured or () if "key" in r and not r.get("error")}
    for i, cfg in enumerate(rows, 1):
        key = row_key(cfg, model, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens, threads, repeat)
        label = f"{settings_label(cfg) if cfg else 'float16'} {cfg['method'] if cfg else ''}"
        if key in earlier:
            progress(f"[{i}/{len(rows)}] {label}: measured by an earlier run")
            results.append(earlier[key])
        else:
            progress(f"[{i}/{len(rows)}] {label}")
            runs = [run_row(cfg, model, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens, threads)
                    for _ in range(repeat)]
            results.append({**median_of_runs(runs), "key": key})
        base = next((r["ppl"] for r in results if r["method"] == "float16" and "ppl" in r), None)
        for r in results:
            if base is not None and "ppl" in r:
                r["delta_ppl"] = r["ppl"] - base
        if on_row is not None:
            on_row(results, done=i == len(rows))
    return results


def row_key(cfg, model, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens, threads, repeat) -> str:
    """What makes two measurements of a row the same (`bench --resume`): its recipe and every argument
    (paths as RESULTS.md shows them: the key is committed with the grid's JSON)."""
    from .results import display_path

    def where(path) -> str:
        full = os.path.abspath(os.path.expanduser(str(path)))
        return display_path(full) if os.path.exists(full) else str(path)

    return json.dumps({"row": cfg, "model": where(model), "calib": where(calib), "eval": where(eval_text),
                       "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "device": str(device),
                       "eval_tokens": eval_tokens, "threads": threads, "repeat": repeat}, sort_keys=True)


TIMED = ("compress_s", "forward_s", "time_vs_forward", "compress_cpu_s", "forward_cpu_s", "cpu_vs_forward")


def median_of_runs(runs: list[dict]) -> dict:
    """One row from repeated runs of it: the median of each time, the largest peak memory, and the
    rest (deterministic: perplexity, bits, sizes) from the first run. `runs` counts them."""
    row = dict(runs[0])
    row["runs"] = len(runs)
    if len(runs) == 1 or any(r.get("error") for r in runs):
        return row
    for key in TIMED:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = statistics.median(values)
    for key in ("peak_rss_mb", "gpu_peak_mb"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = max(values)
    return row
