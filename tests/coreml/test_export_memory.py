"""Export never holds a dense copy of the model: the conversion's peak memory above the loaded model
stays a fraction of the float16 weights (a float32 copy for tracing, or float16 consts of every
weight before the constexpr swap, each add at least the whole weight size again)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process runs and long conversions: make test, not test-fast

pytest.importorskip("coremltools")

# weights (57 M parameters, 114 MB in float16) dominate the program (2 blocks): a dense copy shows
BIG = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
           vocab_size=16384, tie_word_embeddings=False)

CHILD = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from layerwise.coreml import export_mlpackage
from layerwise.solvers import RTNConfig, rtn

def kib(field):  # this process's resident set (VmRSS) or its high-water mark (VmHWM), bytes
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

out, big, compress = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
small = AutoModelForCausalLM.from_config(LlamaConfig(**{**big, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                                        "vocab_size": 256}), dtype=torch.float16)
export_mlpackage(small, out / "warm.mlpackage", context=16)  # imports and coremltools' first-use work
model = AutoModelForCausalLM.from_config(LlamaConfig(**big), dtype=torch.float16).eval()
compressed = {}
if compress:  # as a loaded checkpoint holds them: codes only, the module's weight a placeholder
    from layerwise.memory import placeholder
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            # min/max grids: the clipping search would cost minutes and changes nothing this test measures
            compressed[name] = rtn(m.weight.data.float(), None, RTNConfig(bits=4, block_size=32, mse_clip=False)).compressed
            m.weight.data = placeholder(m.weight.shape, torch.float16)
weights = sum(p.numel() * 2 for p in model.parameters())
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current resident set
export_mlpackage(model, out / "big.mlpackage", context=16, compressed=compressed)
print(json.dumps({"weights": weights, "before": before, "peak": kib("VmHWM")}))
"""


def peak_above_loaded(tmp_path: Path, compress: bool) -> dict:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), json.dumps(BIG), str(int(compress))],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("compress", [False, True], ids=["float16", "rtn4"])
def test_export_holds_no_dense_copy_of_the_weights(tmp_path, compress):
    r = peak_above_loaded(tmp_path, compress)
    extra = r["peak"] - r["before"]
    # measured 0.3 x (rtn4) and 0.6 x (float16: the writer copies a weight or two while saving);
    # before this test, a float32 copy (2 x) and float16 consts (1 x) of the weights came on top
    assert extra < 1.0 * r["weights"], f"export peaked {extra / 2**20:.0f} MiB above the loaded model " \
                                        f"({r['weights'] / 2**20:.0f} MiB of float16 weights)"
