"""What every benchmark row measures besides the compression itself: a plain forward's time, peak
memory, the evaluation tokens and the machine. Shared by our rows (`rows`) and the peers' (`peers`)."""

from __future__ import annotations

import os
import platform
import resource
import time

import torch


@torch.no_grad()
def time_forward(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Seconds of one plain float forward of `model` over the calibration windows [N, L]."""
    model.eval()
    start = time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[i : i + batch_size], use_cache=False)
    return time.perf_counter() - start


def timed_forward(model, windows: torch.Tensor) -> dict:
    """One plain float forward over the windows: wall and CPU seconds (CPU: this process's time, which
    other work on a shared machine disturbs much less)."""
    cpu = time.process_time()
    wall = time_forward(model, windows)
    return {"forward_s": wall, "forward_cpu_s": time.process_time() - cpu}


def add_forward_ratios(row: dict) -> None:
    """Compression time over one forward, wall and CPU, where both are known."""
    if row.get("compress_s") and row.get("forward_s"):
        row["time_vs_forward"] = row["compress_s"] / row["forward_s"]
    if row.get("compress_cpu_s") and row.get("forward_cpu_s"):
        row["cpu_vs_forward"] = row["compress_cpu_s"] / row["forward_cpu_s"]


def gpu_peak_mb() -> float | None:
    """Peak bytes torch's CUDA allocator held in this process (MB), or None without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 1e6


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def evaluation_ids(tokenizer, eval_text: str, eval_tokens: int | None = None) -> torch.Tensor:
    """The evaluation text's token ids, the first `eval_tokens` of them when capped (a slow machine)."""
    from layerwise.calib_data import load_text, tokenize_text

    ids = tokenize_text(tokenizer, load_text(eval_text, "evaluation"))
    return ids if eval_tokens is None else ids[:eval_tokens]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {platform.platform()}"
