"""Data-parallel calibration on real torch.distributed (gloo, CPU): 2 ranks write the same bytes as 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from layerwise.cli import main
from layerwise.distributed import Ranks, cover, tree_sum
from layerwise.job import CompressJob
from layerwise.pipeline import compress_to_checkpoint
from layerwise.recipe import Recipe, recipe_from_dict

from checkpoint_compare import file_hashes, manifest_without_timings, save_sharded

pytestmark = pytest.mark.slow  # multi-process runs and long conversions: make test, not test-fast

# nsamples 10 / batch 2 = 5 batches: 2 ranks get an uneven split (2 + 3)
CALIB = dict(nsamples=10, seqlen=32, seed=0, batch_size=2, device="cpu")
RECIPES = {  # the gptq one also compresses lm_head (its own reduction); rtn is data-free (layers only)
    "gptq": [("lm_head", {"method": "gptq", "bits": 8}), (".*", {"method": "gptq", "bits": 4, "block_size": 32})],
    "sparsegpt": [(".*", {"method": "sparsegpt", "sparsity": 0.5})],
    "skm": [(".*", {"method": "skm", "n_bits": 3})],
    "rtn": [(".*", {"method": "rtn", "bits": 4})],
}


def recipe(name: str) -> Recipe:
    return recipe_from_dict({"rules": [{"match": m, "config": dict(c)} for m, c in RECIPES[name]]})


def test_every_partition_sums_along_the_same_tree():
    """Subtree sums of any contiguous partition, finished on the same tree, equal the 1-rank sum bit
    for bit; a plain left-to-right sum differs (the order matters in float32)."""
    g = torch.Generator().manual_seed(0)
    total = 7
    leaves = [torch.randn(64, generator=g) * 10 ** torch.randint(-3, 4, (64,), generator=g) for _ in range(total)]

    def add(a, b):
        return a + b

    def run(world: int) -> torch.Tensor:
        known = {}
        for r in range(world):
            share = Ranks(r, world).share(total)
            mine = iter(leaves[share.start:share.stop])
            for span in cover(0, total, share):
                known[span] = tree_sum(mine, *span, add)
        return tree_sum(iter(()), 0, total, add, known)

    one = run(1)
    for world in (2, 3, 4, 7):
        assert torch.equal(run(world), one), world
    left_fold = leaves[0]
    for leaf in leaves[1:]:
        left_fold = left_fold + leaf
    assert not torch.equal(left_fold, one)  # so the tree is what makes the partitions agree
    assert torch.allclose(left_fold, one, rtol=1e-5, atol=1e-3)


def _spawned_rank(rank: int, world: int, store: str, src: str, calib: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ranks = Ranks(rank, world)
        for name in RECIPES:
            compress_to_checkpoint(CompressJob(src, Path(root) / f"{name}-{world}", recipe(name), calib, ranks=ranks,
                                               **CALIB))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_outputs(tmp_path_factory, calib_text_file):
    root = tmp_path_factory.mktemp("dist")
    src = save_sharded(root / "src")
    mp.spawn(_spawned_rank, args=(2, str(root / "store"), str(src), str(calib_text_file), str(root)), nprocs=2)
    return root, src


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_gloo_ranks_write_the_one_process_bytes(two_rank_outputs, calib_text_file, name):
    root, src = two_rank_outputs
    single, _ = compress_to_checkpoint(CompressJob(str(src), root / f"{name}-1", recipe(name), str(calib_text_file),
                                                   **CALIB))
    two = root / f"{name}-2"
    hashes = file_hashes(single)
    assert len(hashes) >= 4 and file_hashes(two) == hashes  # 3 blocks, rest (and lm_head)
    assert manifest_without_timings(two) == manifest_without_timings(single)
    assert not list(root.glob(f".{name}-2.*"))  # no partial output or activations left behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A real `layerwise compress` rank; rank `die_rank` exits hard right after finishing block `k`.
DYING_RANK = textwrap.dedent(
    """
    import os, sys
    from layerwise import engine
    die_rank, k = int(sys.argv[1]), int(sys.argv[2])
    process_block = engine.BlockWalker._process_block
    def process_then_die(self, index, *args, **kwargs):
        process_block(self, index, *args, **kwargs)
        if index == k and self.ranks.rank == die_rank:
            os._exit(1)
    engine.BlockWalker._process_block = process_then_die
    from layerwise.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


@pytest.mark.slow
def test_dead_rank_stops_the_other_and_torchrun_resumes_to_the_same_bytes(tmp_path, calib_text_file):
    """Rank 1 dies after block 1: rank 0 stops with one line naming --resume, the finished shards stay;
    `torchrun … -m layerwise compress --resume` then completes the same bytes as one process."""
    src = save_sharded(tmp_path / "src")
    args = ["compress", str(src), "--method", "gptq", "--bits", "4", "--block-size", "32", "--calib",
            str(calib_text_file), "--nsamples", "10", "--seqlen", "32", "--batch-size", "2", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "single")]) == 0
    out = tmp_path / "out"
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", DYING_RANK, "1", "1", *args, "--out", str(out),
                               "--dist-timeout", "60"], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert procs[1].returncode == 1
    assert procs[0].returncode == 2, results[0][1]
    errors = [line for line in results[0][1].splitlines() if "error" in line]
    assert len(errors) == 1 and "--resume" in errors[0] and "Traceback" not in results[0][1]
    partial = tmp_path / ".out.partial"
    assert not out.exists() and sorted(p.name for p in partial.glob("block-*")) == [
        "block-00000.safetensors", "block-00001.safetensors"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "layerwise"]
    refused = subprocess.run(torchrun + args + ["--out", str(out), "--resume", "--seed", "1"], capture_output=True,
                             text=True, timeout=240)  # rank 0's refusal reaches rank 1: no one waits for a timeout
    assert refused.returncode != 0 and refused.stderr.count("calibration.seed was 0") == 1, refused.stderr[-2000:]
    proc = subprocess.run(torchrun + args + ["--out", str(out), "--resume"], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert file_hashes(out) == file_hashes(tmp_path / "single") and not partial.exists()


def test_parked_tree_sums_are_the_same_bits(tmp_path):
    """With park_dir (the --offload-activations mode) a left subtree's Hessian sums wait in files
    while the right one is summed; added back (right += left, a tile at a time) they give the
    in-memory tree's bits, and no file is left."""
    from layerwise.distributed import SINGLE, reduce_hessians
    from layerwise.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    width, total = 600, 5  # wider than one read-back tile; an uneven tree
    xs = [torch.randn(40, width, generator=g) * 10 ** torch.randint(-2, 3, (width,), generator=g) for _ in range(total)]

    def leaves():
        for x in xs:
            acc = HessianAccumulator(width)
            acc.add(x)
            yield {"layer": acc}

    def blank():
        return {"layer": HessianAccumulator(width)}

    kept = reduce_hessians(SINGLE, leaves(), total, blank)["layer"]
    parked = reduce_hessians(SINGLE, leaves(), total, blank, park_dir=tmp_path / "park")["layer"]
    assert parked.rows == kept.rows == 40 * total
    assert torch.equal(parked.hessian, kept.hessian)
    assert not list((tmp_path / "park").iterdir())
