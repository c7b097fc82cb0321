"""MLX and GGUF exports against the formats' own quantizers, on the same perplexity windows (issue 23).

    python benchmarks/formats_bench.py ~/.cache/smollm2-135m ~/.cache/lw-formats --windows 64

Compresses MODEL with GPTQ 4-bit blocks of 32 on the MLX scale lattice (`--grid mlx`), exports the
checkpoint with `--format mlx` and `--format gguf`, and quantizes the float16 model with each format's
own quantizer at the same bits: `mlx_lm convert -q --q-bits 4 --q-group-size 32` and llama.cpp's Q4_1
(`llama_model_quantize`, from an F16 GGUF that `layerwise export --format gguf` writes of the plain
model). Both quantizers also quantize the tied embedding table by default (mlx-lm 4-bit, llama.cpp
Q8_0), which our checkpoint keeps float16; the "embeddings float16" rows keep it float16, the same
size as ours. Every model is scored on the same token ids: the first N non-overlapping 256-token
windows of WikiText-2 test (our tokenizer; exp of the mean NLL of tokens 2..256 of each window).
torch evaluates the float16 model and our checkpoint (`layerwise ppl`'s path, float32 compute); MLX
(mlx_lm.load, its float16 forward) and llama.cpp (llama-cpp-python, logits_all) evaluate theirs.
Prints a Markdown table and replaces the section `## MLX and GGUF exports on SmolLM2-135M` of
benchmarks/RESULTS.md.

Needs: mlx (mlx[cpu] on Linux), mlx-lm, gguf, llama-cpp-python.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM2_ABOUT = (
    "SmolLM2-135M-Instruct in float16, built by `../shared/models/smollm2-135m/make.py`. Caveat (make.py's "
    "docstring): this float16 model is a dequantized llama.cpp Q4_1 file, so its linear weights already lie on a "
    "4-bit affine grid per 32 inputs, and llama.cpp's Q4_1 (min/max per block of 32) finds that grid again almost "
    "exactly; mlx_lm's affine quantizer does not (it places the grid differently), nor does GPTQ on the `mlx` "
    "lattice, whose offsets are whole steps")
SEQLEN = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="float16 Hugging Face directory (e.g. ~/.cache/smollm2-135m)")
    p.add_argument("work", help="directory for the checkpoint, the exports and the peers' files")
    p.add_argument("--windows", type=int, default=None, help="first N 256-token windows (default: all)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows of 256 tokens")
    p.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2" / "valid.txt"))
    p.add_argument("--eval-text", default=str(SHARED / "data" / "wikitext-2" / "test.txt"))
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--reuse", action="store_true", help="keep files already in WORK (checkpoint, exports)")
    p.add_argument("--name", default="SmolLM2-135M", help="the model's name in the section title")
    p.add_argument("--about", default=SMOLLM2_ABOUT, help="what the model is (a sentence of the section)")
    p.add_argument("--table-only", action="store_true",
                   help="score nothing: the table from the windows already scored in WORK (implies --reuse)")
    return p.parse_args(argv)


def cli(*words: str) -> None:
    from layerwise.cli import main

    if main(["-q", *words]) != 0:
        raise SystemExit(f"layerwise {' '.join(words)} failed")


@contextlib.contextmanager
def quiet_fd(fd: int = 2):
    """The C libraries' chatter on stderr (llama.cpp's loader and quantizer) sent to /dev/null."""
    sys.stderr.flush()
    saved, null = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)


def build(model: str, work: Path, nsamples: int, calib: str, reuse: bool) -> dict:
    """Every file the table scores: {key: path}. Also {'compress_s': seconds} of our compression."""
    ck = work / f"gptq4-b32-mlxgrid-n{nsamples}"
    paths = {"ours": ck, "ours-mlx": work / f"{ck.name}-mlx", "ours-gguf": work / f"{ck.name}.gguf",
             "f16-gguf": work / "f16.gguf", "mlxlm": work / "mlxlm-q4-g32", "mlxlm-emb16": work / "mlxlm-q4-g32-emb16",
             "q4_1": work / "llamacpp-q4_1.gguf", "q4_1-emb16": work / "llamacpp-q4_1-emb16.gguf"}
    over = [] if reuse else ["--overwrite"]
    timings = {}
    if not (reuse and ck.exists()):
        start = time.time()
        cli("compress", model, "--out", str(ck), "--method", "gptq", "--bits", "4", "--block-size", "32",
            "--grid", "mlx", "--calib", calib, "--nsamples", str(nsamples), "--seqlen", str(SEQLEN), "--seed", "0",
            "--overwrite")
        timings["compress_s"] = time.time() - start
    for key, src, fmt in (("ours-mlx", ck, "mlx"), ("ours-gguf", ck, "gguf"), ("f16-gguf", model, "gguf")):
        if not (reuse and paths[key].exists()):
            cli("export", str(src), "--format", fmt, "--out", str(paths[key]), *over)
    for key, keep_embeddings in (("mlxlm", False), ("mlxlm-emb16", True)):
        if not (reuse and paths[key].exists()):
            mlx_convert(model, paths[key], keep_embeddings)
    for key, keep_embeddings in (("q4_1", False), ("q4_1-emb16", True)):
        if not (reuse and paths[key].exists()):
            llama_quantize(paths["f16-gguf"], paths[key], keep_embeddings)
    return {**paths, **timings}


def mlx_convert(model: str, out: Path, keep_embeddings: bool) -> None:
    """mlx_lm convert -q --q-bits 4 --q-group-size 32 (the CLI's defaults otherwise); with
    keep_embeddings the embedding table and the output head (tied or not) stay float16, as ours do."""
    import shutil

    from mlx_lm import convert

    if out.exists():
        shutil.rmtree(out)
    predicate = (lambda path, module, *_: "embed_tokens" not in path and "lm_head" not in path) if keep_embeddings else None
    convert(str(model), str(out), quantize=True, q_group_size=32, q_bits=4, quant_predicate=predicate)


def llama_quantize(f16: Path, out: Path, keep_embeddings: bool) -> None:
    """llama.cpp's Q4_1 of an F16 GGUF through the C API (llama-quantize's own code path); with
    keep_embeddings token_embd and an untied output head stay F16 (as ours do), else llama.cpp picks
    their types (Q8_0 on SmolLM2: 576 columns are not a multiple of Q6_K's 256)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    params.nthread = os.cpu_count() or 1
    if keep_embeddings:
        params.token_embedding_type = llama_cpp.GGML_TYPE_F16
        params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    with quiet_fd():
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {f16} -> {out} failed ({rc})")


def gguf_types(path: Path) -> str:
    """The tensor types of a GGUF file with their counts, e.g. 'Q4_1 ×210, F16 ×1, F32 ×61'."""
    from collections import Counter

    import gguf

    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return ", ".join(f"{name} ×{n}" for name, n in counts.most_common())


def eval_tokens(model: str, text: str, windows: int | None) -> np.ndarray:
    """[N, 256] int64: the first `windows` non-overlapping windows of the text under MODEL's tokenizer,
    cut as `layerwise ppl` cuts them: 256 tokens of text, or BOS + 255 when the tokenizer adds a BOS
    (Gemma). Every runtime scores positions 2..256 of a window: all of its text tokens after the first
    (with BOS: all of them, BOS never scored)."""
    from layerwise.calib_data import bos_token_id, load_text, tokenize_text, with_bos
    from layerwise.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    bos = bos_token_id(tokenizer)
    ids = tokenize_text(tokenizer, load_text(text, "evaluation"))
    width = SEQLEN - (bos is not None)
    total = len(ids) // width
    n = total if windows is None else min(windows, total)
    return with_bos(ids[: n * width].reshape(n, width), bos).numpy(), total, bos


def nll_torch(path: Path | str, windows: np.ndarray):
    """`layerwise ppl`'s computation (evaluate_perplexity, float32 compute), one window at a time:
    each window's summed NLL of tokens 2..256."""
    import torch

    from layerwise.pipeline import evaluate_perplexity
    from layerwise.loading import load_model

    model = load_model(str(path), dtype="float32", device="cpu")
    for row in windows:
        res = evaluate_perplexity(model, "", SEQLEN, token_ids=torch.from_numpy(row))
        assert res["windows"] == 1 and res["bos_token_id"] is None
        yield res["nll"] * res["tokens"]


def nll_mlx(path: Path, windows: np.ndarray):
    """mlx_lm.load(DIR); each window's logits from the model, log-softmax in float32. The model runs
    in float32 (`set_dtype`: scales, biases, norms, embeddings): mlx's CPU float16 kernels are far too
    slow here; the quantized weights are still MLX's own `quantized_matmul` of the stored codes."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    for row in windows:
        ids = mx.array(row[None].astype(np.int32))
        logits = model(ids[:, :-1]).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        yield float(-mx.take_along_axis(logp, ids[:, 1:, None], axis=-1).sum().item())


def nll_llama(path: Path, windows: np.ndarray):
    """llama.cpp through llama-cpp-python: each window evaluated from an empty cache with every
    position's logits kept; NLL from a float64 log-softmax in numpy."""
    import llama_cpp

    with quiet_fd():
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=SEQLEN, n_batch=SEQLEN, verbose=False,
                              n_threads=os.cpu_count())
    for row in windows:
        llm.reset()
        llm.eval(row.tolist())
        logits = np.asarray(llm.scores[: SEQLEN - 1], dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        logz = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[:, 0]
        yield float((logz - logits[np.arange(SEQLEN - 1), row[1:]]).sum())
    llm.close()


def scored(key: str, runtime: str, path, windows: np.ndarray, work: Path) -> list[float]:
    """Per-window NLL sums of the first len(windows) windows, cached in WORK/nll-KEY.json (resumed:
    only windows not yet scored run; the cache is keyed by the windows' token ids)."""
    cache = work / f"nll-{key}.json"
    digest = _digest(windows)
    done = json.loads(cache.read_text()) if cache.exists() else {}
    nll = done.get("nll", []) if done.get("tokens") == digest[: len(done.get("nll", []))] else []
    todo = windows[len(nll):]
    if len(todo):
        print(f"{key}: scoring windows {len(nll) + 1}..{len(windows)} with {runtime}", flush=True)
        for value in NLL[runtime](path, todo):
            nll.append(value)
            cache.write_text(json.dumps({"tokens": digest[: len(nll)], "nll": nll}))
    return nll[: len(windows)]


def _digest(windows: np.ndarray) -> list[str]:
    import hashlib

    return [hashlib.sha1(row.astype("<i8").tobytes()).hexdigest()[:12] for row in windows]


NLL = {"torch": nll_torch, "mlx": nll_mlx, "llama.cpp": nll_llama}


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def row_specs(model: str, paths: dict) -> list[tuple[str, str, str, Path, int]]:
    """(key, what, runtime, path, bytes on disk) of every row, float16 first."""
    specs = [
        ("f16", "float16 (Hugging Face)", "torch"),
        ("f16-gguf", "float16 → GGUF F16 (`layerwise export --format gguf`)", "llama.cpp"),
        ("ours", "ours: GPTQ 4-bit blocks of 32, `--grid mlx` (checkpoint)", "torch"),
        ("ours-mlx", "ours → `--format mlx`", "mlx"),
        ("mlxlm-emb16", "mlx_lm convert 4-bit group 32, embeddings float16", "mlx"),
        ("mlxlm", "mlx_lm convert -q --q-bits 4 --q-group-size 32", "mlx"),
        ("ours-gguf", "ours → `--format gguf`", "llama.cpp"),
        ("q4_1-emb16", "llama.cpp Q4_1 of F16, token_embd F16", "llama.cpp"),
        ("q4_1", "llama.cpp Q4_1 of F16 (token_embd Q8_0, its default)", "llama.cpp"),
    ]
    paths = {**paths, "f16": Path(model)}
    size = lambda p: safetensors_bytes(p) if p.is_dir() else p.stat().st_size  # noqa: E731
    return [(key, what, runtime, paths[key], size(paths[key])) for key, what, runtime in specs]


def ppl(nll: list[float], n: int) -> float | None:
    return math.exp(sum(nll[:n]) / (n * (SEQLEN - 1))) if n and len(nll) >= n else None


def table(rows: list[tuple], nlls: dict, target: int) -> tuple[str, int]:
    """The Markdown table: ppl over the windows every row has (`common`) and over the first `target`."""
    common = min(len(nlls[key]) for key, *_ in rows)
    base_c, base_t = ppl(nlls["f16"], common), ppl(nlls["f16"], target)
    fmt = lambda v, sign="": "–" if v is None else f"{v:{sign}.3f}"  # noqa: E731
    lines = [f"| model | runtime | MB on disk | windows scored | ppl, first {common} windows | Δppl vs float16 | "
             f"ppl, first {target} windows | Δppl vs float16 |", "|---|---|---|---|---|---|---|---|"]
    for key, what, runtime, _, size in rows:
        pc, pt = ppl(nlls[key], common), ppl(nlls[key], target)
        lines.append(f"| {what} | {runtime} | {size / 1e6:.2f} | {len(nlls[key])} | {fmt(pc)} | "
                     f"{fmt(pc and pc - base_c, '+')} | {fmt(pt)} | {fmt(pt and base_t and pt - base_t, '+')} |")
    return "\n".join(lines), common


def acceptance(nlls: dict, sizes: dict) -> list[str]:
    """The issue's acceptance lines, each pair compared over the windows both rows have."""
    out = []

    def pair(a, b):
        n = min(len(nlls[a]), len(nlls[b]))
        return n, ppl(nlls[a], n), ppl(nlls[b], n)

    for ours, peer, fmt in (("ours-mlx", "mlxlm-emb16", "MLX"), ("ours-gguf", "q4_1-emb16", "GGUF")):
        n, a, b = pair(ours, peer)
        if n:
            verdict = "holds" if a < b else "FAILS"
            out.append(f"- {fmt}, ours vs the format's quantizer at equal size ({sizes[ours] / 1e6:.2f} vs "
                       f"{sizes[peer] / 1e6:.2f} MB): {a:.3f} vs {b:.3f} over {n} windows: {verdict}")
    for export, runtime in (("ours-gguf", "llama.cpp"), ("ours-mlx", "MLX")):
        n, a, b = pair(export, "ours")
        if n:
            gap = a / b - 1
            verdict = "holds" if abs(gap) < 0.005 else "FAILS"
            out.append(f"- {runtime} on our export vs `layerwise ppl` of the checkpoint: {a:.3f} vs {b:.3f} "
                       f"({gap:+.2%}) over {n} windows, within 0.5 %: {verdict}")
    return out


def section(command: str, args, body: str, checks: list[str], total: int, common: int, compress_s,
            bos: int | None = None) -> str:
    from layerwise.bench.measure import machine
    from layerwise.bench.results import display_path
    from importlib.metadata import version

    names = ("layerwise", "torch", "transformers", "mlx", "mlx-lm", "llama_cpp_python", "gguf")
    v = {name: version(name) for name in names}
    return "\n".join([
        f"## MLX and GGUF exports on {args.name}", "", f"Reproduce: `{command}`", "",
        f"Model `{display_path(args.model)}` ({args.about}). Ours: `layerwise compress --method gptq --bits 4 --block-size 32 "
        f"--grid mlx`, calibration {args.nsamples} × {SEQLEN}-token windows of `{display_path(args.calib)}` (seed 0)"
        + (f", {compress_s:.0f} s" if compress_s else "") + ", exported with `layerwise export --format mlx` and "
        "`--format gguf` (every weight equal to the checkpoint's bit for bit, as the exporters report). The formats' "
        "own quantizers at the same bits: `mlx_lm convert -q --q-bits 4 --q-group-size 32`, and llama.cpp's Q4_1 "
        "(`llama_model_quantize`, llama-quantize's code) of the F16 GGUF our exporter writes of the float16 model. "
        "Both quantize the tied embedding table by default, which our checkpoint keeps float16, so each also "
        "appears with the embeddings float16: the equal-size comparison.",
        "",
        f"Perplexity on `{display_path(args.eval_text)}` under the model's tokenizer "
        f"({'each window its BOS and 255 tokens of text, BOS never scored' if bos is not None else 'no BOS'}): "
        "the first windows of "
        f"its {total} non-overlapping {SEQLEN}-token windows, the same token ids for every row, exp of the mean NLL "
        "of tokens 2..256 of each window. torch scores the float16 model and our checkpoint (`layerwise ppl`'s "
        "code, float32); MLX scores its directories with `mlx_lm.load` in float32 (mlx's CPU float16 kernels "
        "are far too slow on this machine; the 4-bit layers still run MLX's own `quantized_matmul` on the stored "
        "codes); llama.cpp (llama-cpp-python, `logits_all`, n_ctx 256) scores the GGUF files, log-softmax "
        "in float64. MB on disk: safetensors bytes (checkpoint, MLX directory), file bytes (GGUF). "
        f"Versions: {', '.join(f'{k} {x}' for k, x in v.items())}. Machine: {machine()} (shared with other jobs).",
        "", body, "", *checks,
        "" if common >= (args.windows or total) else
        f"\nEach row is scored over the windows it reached in the time given (column \"windows scored\"); the "
        f"first ppl column compares every row on the same {common} windows.",
        "" if not args.table_only else "\nRendered with `--table-only` from the per-window NLLs that earlier runs "
        "of this script cached in WORK (`nll-KEY.json`, keyed by the windows' token ids).",
    ]).rstrip() + "\n"


def section_name(name: str) -> str:
    """The RESULTS.md marker of this model's section (SmolLM2 keeps the first one's name)."""
    return "formats" if name == "SmolLM2-135M" else "formats-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def main(argv=None) -> int:
    args = parse_args(argv)
    from layerwise.bench.results import display_path, update_results

    model, work = os.path.expanduser(args.model), Path(os.path.expanduser(args.work))
    work.mkdir(parents=True, exist_ok=True)
    paths = build(model, work, args.nsamples, args.calib, args.reuse or args.table_only)
    windows, total, bos = eval_tokens(model, args.eval_text, args.windows)
    rows = row_specs(model, paths)
    nlls = {}
    for key, _, runtime, path, _ in rows:
        nlls[key] = scored(key, runtime, path, windows, work) if not args.table_only else cached(work, key, windows)
    body, common = table(rows, nlls, len(windows))
    checks = acceptance(nlls, {key: size for key, *_, size in rows})
    words = ["python", *(display_path(w) for w in sys.argv)]
    command = " ".join(words)
    text = section(command, args, body, checks, total, common, paths.get("compress_s"), bos)
    print(text)
    update_results(Path(args.results), section_name(args.name), text)
    return 0


def cached(work: Path, key: str, windows: np.ndarray) -> list[float]:
    """The per-window NLLs already in WORK's cache for these windows (a prefix; maybe none)."""
    cache = work / f"nll-{key}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {"tokens": [], "nll": []}
    digest, n = _digest(windows), 0
    while n < min(len(done["nll"]), len(digest)) and done["tokens"][n] == digest[n]:
        n += 1
    return done["nll"][:n]


if __name__ == "__main__":
    sys.exit(main())
