"""The MSE-clipping search before and after issue 15, on one 2048 x 5632 layer, one torch thread, CPU seconds.

    git archive de7db50 | tar -x -C /tmp/lw-before        # the code before
    python benchmarks/clip_before_after.py /tmp/lw-before .
"""
import importlib
import sys
import time

import torch

torch.set_num_threads(1)


def load(path):
    for k in [k for k in sys.modules if k.startswith("layerwise")]:
        del sys.modules[k]
    sys.path.insert(0, path)
    rtn, cfg = (importlib.import_module(f"layerwise.solvers.{m}") for m in ("rtn", "quant_config"))
    sys.path.pop(0)
    return rtn, cfg


torch.manual_seed(0)
w = torch.randn(2048, 5632) * 0.02  # one MLP layer of the ~400 M random Llama
for name, path in [("before", sys.argv[1]), ("after", sys.argv[2])] * 2:
    rtn, cfg = load(path)
    c, t = time.process_time(), time.perf_counter()
    rtn.rtn(w, None, cfg.RTNConfig(bits=4, block_size=32))
    print(name, f"cpu {time.process_time() - c:.2f} s wall {time.perf_counter() - t:.2f} s", flush=True)
