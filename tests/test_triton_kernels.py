"""The Triton SLL-convolution kernels, run on the CPU by Triton's interpreter (CI has no GPU).

Each check runs in a subprocess because ``TRITON_INTERPRET`` must be set before Triton is
imported. On a GPU the same kernels are self-checked by lipsim.fast before first use, and the
benchmark compares them with the baseline network before timing them.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SRC = Path(__file__).resolve().parents[1] / "src" / "lipsim" / "triton_kernels.py"


def _interpret(code: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", LIPSIM_KERNELS="triton", OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kernel_matches_the_sll_convolution_in_the_interpreter():
    code = """
import json, torch, torch.nn.functional as F
from lipsim import triton_kernels as tk
from lipsim.layers import fold_sll_conv, safe_inverse, sll_conv_rescaling
errs = []
# s2d-lite's stage widths, the published small's (45 channels, inner 5), a non-square map, batch 3
for n, c, inner, h, w in [(2, 48, 16, 9, 9), (1, 45, 5, 7, 7), (1, 192, 32, 5, 5), (3, 20, 7, 6, 10)]:
    g = torch.Generator().manual_seed(c)
    K = torch.randn(inner, c, 3, 3, generator=g) * 0.3
    b = torch.randn(inner, generator=g)
    s = 2 * safe_inverse(sll_conv_rescaling(K))
    x = torch.randn(n, c, h, w, generator=g)
    ref = x - F.conv_transpose2d(F.relu(F.conv2d(x, K, b, padding=1)) * s.view(1, -1, 1, 1), K, padding=1)
    packed = tk.pack_weights(*fold_sll_conv(K, b, s))
    out = tk.sll_conv_(x.contiguous(memory_format=torch.channels_last), *packed)
    errs.append(float((out - ref).norm() / ref.norm()))
print(json.dumps({"errs": errs}))
"""
    errs = _interpret(code)["errs"]
    assert len(errs) == 4 and max(errs) <= 1e-5, errs


def test_fast_path_uses_triton_kernels_and_computes_the_same_function():
    code = """
import json, torch
import lipsim
from lipsim import fast
from lipsim.spec import ArchConfig
config = ArchConfig("t", "s2d", out_dim=32, stages=((2, 16),), pool=14, depth_linear=1, n_features=16)
model = lipsim.LipSim.from_config(config).eval().requires_grad_(False)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.backbone.named_parameters():
        if name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
x = torch.rand(1, 3, 224, 224, generator=g)
with torch.no_grad():
    a, b = model.freeze().features(x), model.backbone(x)  # frozen engine vs the plain layers
print(json.dumps({"kernels": fast.kernels_for("cpu"), "rel": float((a - b).norm() / b.norm())}))
"""
    out = _interpret(code)
    assert out["kernels"] == "triton"
    assert out["rel"] <= 1e-5


def test_every_float32_dot_is_ieee():
    """tl.dot defaults to TF32 for float32 on GPUs, which would break the certified path."""
    source = SRC.read_text()
    dots = re.findall(r"tl\.dot\(([^)]*)\)", source)
    assert dots, "no tl.dot calls found"
    assert all('input_precision="ieee"' in call for call in dots), dots
