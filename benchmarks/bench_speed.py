"""Speed of LipSim embedding and training, measured side by side in one run on this machine.

Compared, on the published ``small`` and on the default architecture (``--default-arch``):

* ``baseline``: a straightforward implementation of the published network written in this file
  (plain PyTorch ops, the rescaling T recomputed on every forward, no caching, NCHW), loaded with
  the *same weights* as the lipsim model; the run checks that both compute the same function
  (backbone outputs within a relative error of 1e-5, first training loss and gradients too)
  and refuses to report a row that disagrees;
* ``lipsim plain``: lipsim's layers themselves (``model.backbone``, T recomputed on every forward);
* ``lipsim fast``: the frozen engine (``model.freeze()``, weights folded once), the certified
  float32 path (``frozen.embed``);
* ``lipsim unfrozen``: ``model.embed`` on a model that is not frozen (it folds on every call);
* ``lipsim bf16``: ``embed_fast`` (bfloat16, never certified) on the frozen engine;
* ``lipsim fast triton`` (CUDA): the frozen engine with the Triton kernels (opt-in in the library
  until these rows show them faster than the cuDNN ones), checked against the baseline first;
* ``numpy engine`` (CPU): :class:`lipsim.numpy_engine.NumpyLipSim`, the torch-free float32 path
  that ``lipsim distance``/``compare`` use (its threads: NumPy's BLAS, set by OMP_NUM_THREADS);
* training: forward + backward + Adam step, float32 (IEEE, TF32 off on GPUs), baseline vs lipsim;
* on GPUs only: a DreamSim-shaped ensemble (ViT-B/16 + two ViT-B/32, random weights; timm if
  installed, else torchvision's identical ViT-B) for scale;
* on CPU: peak resident memory of each configuration (one subprocess each) and the wall time of
  ``lipsim distance a.jpg b.jpg`` as a subprocess with each engine, next to
  ``python -c "import torch"``.

Repeats are interleaved (one call of each implementation per round) and medians reported, so
that a machine shared with other work slows all rows alike. Typical use:

    .venv/bin/python benchmarks/bench_speed.py                      # CPU, 2 threads
    .venv/bin/python benchmarks/bench_speed.py --quick              # fewer repeats, tiny batches
    .venv/bin/python benchmarks/bench_speed.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py
from torch import nn

import lipsim
from lipsim import fast
from lipsim.archs import ArchConfig, get_config
from lipsim.embedding import normalise
from lipsim.layers import fold_sll_conv, use_fused_training
from lipsim.model import exact_float32

REL_TOL = 1e-5
GRAD_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# The baseline: the published network, written plainly (independent of lipsim.layers)
# ---------------------------------------------------------------------------------------------


def safe_inv(x: torch.Tensor) -> torch.Tensor:
    inv = x**-1
    return torch.where(x == 0, torch.zeros_like(inv), inv)


class BaselineSLLConv(nn.Module):
    """The published SDPBasedLipschitzConvLayer forward, T recomputed every call."""

    def __init__(self, cin: int, inner: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(inner, cin, 3, 3) * 0.1)
        self.bias = nn.Parameter(torch.zeros(1, inner, 1, 1))
        self.q = nn.Parameter(torch.randn(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ktk = torch.abs(F.conv2d(self.kernel, self.kernel, padding=2))
        q = torch.exp(self.q).reshape(-1, 1, 1, 1)
        q_inv = torch.exp(-self.q).reshape(-1, 1, 1, 1)
        t = safe_inv((q_inv * ktk * q).sum((1, 2, 3)))  # exp(q) and exp(-q) on one axis (published)
        res = F.conv2d(x, self.kernel, padding=1) + self.bias
        res = t.reshape(1, -1, 1, 1) * F.relu(res)
        return x - 2 * F.conv_transpose2d(res, self.kernel, padding=1)


class BaselineSLLLinear(nn.Module):
    """The published SDPBasedLipschitzLinearLayer forward, T recomputed every call."""

    def __init__(self, cin: int, inner: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inner, cin) / cin**0.5)
        self.bias = nn.Parameter(torch.zeros(1, inner))
        self.q = nn.Parameter(torch.randn(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.exp(self.q)[None, :]
        q_inv = torch.exp(-self.q)[:, None]
        t = safe_inv(torch.abs(q_inv * (self.weight @ self.weight.T) * q).sum(1))
        res = t * F.relu(F.linear(x, self.weight) + self.bias)
        return x - 2 * F.linear(res, self.weight.T)


class BaselineNet(nn.Module):
    """The backbone described by an :class:`ArchConfig` (its numbers only), in plain ops."""

    def __init__(self, c: ArchConfig):
        super().__init__()
        self.c = c
        self.convs = nn.ModuleList()
        self.stage_of: list[int] = []
        if c.family == "published":
            for _ in range(c.depth):
                self.convs.append(BaselineSLLConv(c.channels, c.conv_size))
                self.stage_of.append(0)
        else:
            channels = 3 * c.s2d**2
            for i, (n, inner) in enumerate(c.stages):
                if i > 0:
                    channels *= 4
                for _ in range(n):
                    self.convs.append(BaselineSLLConv(channels, inner))
                    self.stage_of.append(i)
        self.linears = nn.ModuleList(
            BaselineSLLLinear(c.feature_width(), c.n_features) for _ in range(c.depth_linear)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        if c.family == "published":
            x = F.pad(x, (0, 0, 0, 0, 0, c.channels - x.shape[1]))
            for conv in self.convs:
                x = conv(x)
            x = F.avg_pool2d(x, 4, divisor_override=4)
            x = F.avg_pool2d(x, 4, divisor_override=4)
            x = x.flatten(1)
        else:
            if getattr(c, "center", 0.0):
                x = x - c.center
            x = F.pixel_unshuffle(x, c.s2d)
            stage = 0
            for conv, s in zip(self.convs, self.stage_of, strict=True):
                if s != stage:
                    x, stage = F.pixel_unshuffle(x, 2), s
                x = conv(x)
            if c.pool > 1:
                x = F.avg_pool2d(x, c.pool, divisor_override=c.pool)
            x = x.flatten(1)
            width = c.feature_width()
            x = F.pad(x, (0, width - x.shape[1])) if width > x.shape[1] else x[:, :width]
        for lin in self.linears:
            x = lin(x)
        return x[:, : c.out_dim]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self(x)
        z = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)  # "append" embedding, as lipsim's default
        return z / z.norm(dim=1, keepdim=True)


def baseline_like(model: lipsim.LipSim) -> BaselineNet:
    """A baseline holding copies of ``model``'s weights (layers matched in order)."""
    base = BaselineNet(model.config)
    ours = [m for _, m in model.backbone.lipschitz_layers() if hasattr(m, "q")]
    theirs = list(base.convs) + list(base.linears)
    if len(ours) != len(theirs):
        raise RuntimeError("baseline and lipsim disagree on the number of SLL layers")
    with torch.no_grad():
        for a, b in zip(ours, theirs, strict=True):
            for name, p in b.named_parameters():
                p.copy_(getattr(a, name).detach().reshape(p.shape))
    return base.to(model.device)


# ---------------------------------------------------------------------------------------------
# Machine description and timing
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs visible)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function; each round calls every function once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------


def make_model(arch: str, device: torch.device) -> lipsim.LipSim:
    model = lipsim.create_model(arch, seed=0, device=device)
    # random but non-trivial biases so that ReLUs are not all on one side
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.endswith("bias"):
                p.copy_((torch.rand(p.shape, generator=gen) - 0.5).mul_(0.2).to(device))
    return model.requires_grad_(False)


def bench_embedding(arch: str, batch: int, args, device: torch.device, rows: list, notes: list) -> None:
    plain = make_model(arch, device)  # "plain": its layers; "fast": the frozen engine
    fast_model = plain.freeze()
    base = baseline_like(plain).requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand((batch, 3, 224, 224), generator=gen).to(device)

    with torch.no_grad(), exact_float32():
        f_base = base(x)
    with torch.no_grad(), exact_float32():
        f_plain = plain.backbone(x)
    f_fast = fast_model.features(x)
    errs = {"lipsim plain": rel_err(f_plain, f_base), "lipsim fast": rel_err(f_fast, f_base)}
    errs_fast_vs_plain = rel_err(f_fast, f_plain)
    g16 = fast_model.embed_fast(x)
    bf16_err = rel_err(g16, fast_model.embed(x))

    def run_base():
        with torch.no_grad(), exact_float32():
            base.embed(x)

    def run_plain():
        with torch.no_grad(), exact_float32():
            normalise(plain.backbone(x), plain.embedding)

    errs["lipsim unfrozen"] = rel_err(plain.features(x), f_base)
    fns = {
        "baseline": run_base,
        "lipsim plain": run_plain,
        "lipsim fast": lambda: fast_model.embed(x),
        "lipsim unfrozen": lambda: plain.embed(x),
        "lipsim bf16": lambda: fast_model.embed_fast(x),
    }
    if device.type == "cuda" and not args.no_triton:
        with fast.use_kernels("triton"):
            chosen = fast.kernels_for(device)
            if chosen == "triton":
                errs["lipsim fast triton"] = rel_err(fast_model.features(x), f_base)
        if chosen == "triton":

            def run_triton():
                with fast.use_kernels("triton"):
                    fast_model.embed(x)

            fns["lipsim fast triton"] = run_triton
        else:
            notes.append(f"{arch}: Triton kernels unavailable or failed their self-check on {device}")
    if device.type == "cpu" and not args.no_numpy:
        from lipsim.numpy_engine import NumpyLipSim

        state = {k: v.detach().cpu().numpy() for k, v in plain.backbone.state_dict().items()}
        twin = NumpyLipSim(plain.config, state, embedding=plain.embedding)
        x_np = x.cpu().numpy()
        errs["numpy engine"] = rel_err(torch.from_numpy(twin.features(x_np)), f_base)
        fns["numpy engine"] = lambda: twin.embed(x_np)
    refused = [k for k, e in errs.items() if e > REL_TOL]
    if errs_fast_vs_plain > REL_TOL and "lipsim fast" not in refused:
        refused.append("lipsim fast")
    for k in refused:
        notes.append(f"{arch}: '{k}' REFUSED: differs from the baseline (rel err {errs[k]:.1e})")
        fns.pop(k)
        if k == "lipsim fast":
            fns.pop("lipsim bf16", None)
    times = interleaved(fns, args.repeats, args.warmup, device)
    base_med = statistics.median(times["baseline"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            dict(
                task="embed",
                arch=arch,
                impl=name,
                precision="bf16 (not certified)" if name == "lipsim bf16" else "fp32",
                batch=batch,
                img_s=batch / med,
                speedup=base_med / med,
                spread=f"{batch / max(ts):.3g}-{batch / min(ts):.3g}",
                check=(
                    "reference"
                    if name == "baseline"
                    else f"rel {bf16_err:.0e} vs fp32"
                    if name == "lipsim bf16"
                    else f"rel {errs[name]:.0e}"
                ),
            )
        )
    kern = fast.kernels_for(device)
    notes.append(
        f"{arch}: fused kernels on {device.type}: {kern}; fast vs plain rel err {errs_fast_vs_plain:.1e}"
    )


class _FrozenBackbone(nn.Module):
    """The fused inference function with the current weights baked in as buffers, written with
    plain PyTorch ops so that inductor can trace it (for the optional torch.compile row)."""

    def __init__(self, model: lipsim.LipSim, example: torch.Tensor):
        super().__init__()
        from lipsim.layers import SLLConv2d, SLLLinear

        self.steps: list = []
        for i, (_, layer) in enumerate(model.backbone.lipschitz_layers()):
            if isinstance(layer, SLLConv2d):
                k1, b1, k2 = fold_sll_conv(layer.kernel, layer.bias, layer.scale())
                pad = layer.kernel.shape[-1] // 2
                for name, t in (("k1", k1), ("b1", b1), ("k2", k2)):
                    self.register_buffer(f"{name}_{i}", t.contiguous())
                self.steps.append(("conv", i, pad))
            elif isinstance(layer, SLLLinear):
                self.register_buffer(f"w_{i}", layer.weight.detach().clone())
                self.register_buffer(f"b_{i}", layer.bias.detach().view(-1).clone())
                self.register_buffer(f"s_{i}", layer.scale().detach().clone())
                self.steps.append(("linear", i, 0))
            else:
                self.steps.append(("module", layer, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, i, pad in self.steps:
            if kind == "conv":
                res = F.relu(F.conv2d(x, getattr(self, f"k1_{i}"), getattr(self, f"b1_{i}"), padding=pad))
                x = x + F.conv2d(res, getattr(self, f"k2_{i}"), padding=pad)
            elif kind == "linear":
                w = getattr(self, f"w_{i}")
                res = F.relu(F.linear(x, w, getattr(self, f"b_{i}"))) * getattr(self, f"s_{i}")
                x = x - res @ w
            else:
                x = i(x)
        return x


def bench_compiled(arch: str, batch: int, args, device: torch.device, rows: list, notes: list) -> None:
    """``torch.compile`` of the frozen fused backbone against the baseline and the fused path.

    Its own section, run last: compiling takes minutes, and a run cut short by a time limit
    keeps every row measured before it."""
    model = make_model(arch, device).freeze()
    base = baseline_like(model).requires_grad_(False).eval()
    x = torch.rand((batch, 3, 224, 224), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad(), exact_float32():
        f_base = base(x)
    compiled, seconds = compiled_backbone(model, x)
    with torch.no_grad(), exact_float32():
        err = rel_err(compiled(x), f_base)
    notes.append(
        f"{arch}: torch.compile (inductor, freezing, fused weights as constants): first call "
        f"{seconds:.1f} s incl. compilation; the frozen copy does not follow weight updates"
    )
    if err > REL_TOL:
        notes.append(f"{arch}: 'torch.compile' REFUSED: differs from the baseline (rel err {err:.1e})")
        return

    def run_base():
        with torch.no_grad(), exact_float32():
            base.embed(x)

    def run_compiled():
        with torch.no_grad(), exact_float32():
            compiled(x)

    fns = {"baseline": run_base, "lipsim fast": lambda: model.embed(x), "torch.compile": run_compiled}
    times = interleaved(fns, args.repeats, args.warmup, device)
    base_med = statistics.median(times["baseline"])
    ts = times["torch.compile"]
    rows.append(
        dict(
            task="embed",
            arch=arch,
            impl="torch.compile",
            precision="fp32",
            batch=batch,
            img_s=batch / statistics.median(ts),
            speedup=base_med / statistics.median(ts),
            spread=f"{batch / max(ts):.3g}-{batch / min(ts):.3g}",
            check=f"rel {err:.0e}",
        )
    )
    notes.append(
        f"{arch}: torch.compile section's own baseline {batch / base_med:.3g} img/s, lipsim fast "
        f"{batch / statistics.median(times['lipsim fast']):.3g} img/s (same run)"
    )


def compiled_backbone(model: lipsim.LipSim, x: torch.Tensor):
    """``torch.compile`` of the frozen fused backbone; returns (callable, seconds of the first call)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    frozen = _FrozenBackbone(model, x).eval()
    compiled = torch.compile(frozen)
    t = time.perf_counter()
    with torch.no_grad(), exact_float32():
        compiled(x)
    return compiled, time.perf_counter() - t


def bench_training(arch: str, batch: int, args, device: torch.device, rows: list, notes: list) -> None:
    model = make_model(arch, device)
    base = baseline_like(model)
    backbone = model.backbone.train().requires_grad_(True)
    base.train().requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((batch, 3, 224, 224), generator=gen).to(device)
    target = (torch.randn((batch, model.config.out_dim), generator=gen) * 0.01).to(device)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def loss_of(net, inp):
        return (net(inp) - target).square().mean()

    # same function and same gradients on shared weights (first step, before any update)
    ours = [m for _, m in backbone.lipschitz_layers() if hasattr(m, "q")]
    ours_params = [p for m in ours for p in (m.kernel if hasattr(m, "kernel") else m.weight, m.bias, m.q)]
    with exact_float32():
        lb, lo = loss_of(base, x), loss_of(backbone, x)
        gb = torch.autograd.grad(lb, list(base.parameters()), allow_unused=True)
        go = torch.autograd.grad(lo, ours_params, allow_unused=True)
    loss_err = abs(lb.item() - lo.item()) / max(abs(lb.item()), 1e-30)
    # the SLL-conv q cancels in the published formula: no (or a rounding-level) gradient, skipped
    grad_errs = [
        rel_err(o.reshape(-1), b.reshape(-1))
        for b, o in zip(gb, go, strict=True)
        if b is not None and o is not None
    ]
    grad_err = max(grad_errs) if grad_errs else float("nan")

    opt_b = torch.optim.Adam(base.parameters(), lr=1e-5)
    opt_o = torch.optim.Adam(backbone.parameters(), lr=1e-5)

    def step(net, opt, inp, amp=False):
        # amp: bf16 autocast around the forward, as lipsim.train does on GPUs (--amp auto); the
        # parameters, gradients and optimizer stay float32, and bf16 needs no loss scaling
        def go_():
            with exact_float32():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = loss_of(net, inp)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return go_

    # the same lipsim model without the fused training node (each SLL convolution as 5 graph ops)
    unfused = use_fused_training(copy.deepcopy(model), False).backbone.train().requires_grad_(True)
    opt_u = torch.optim.Adam(unfused.parameters(), lr=1e-5)
    fns = {
        "baseline": step(base, opt_b, x),
        "lipsim layer-by-layer": step(unfused, opt_u, x),
        "lipsim": step(backbone, opt_o, x),
    }
    if args.train_channels_last:
        fns["lipsim channels-last"] = step(backbone, opt_o, x_cl)
    amp = device.type == "cuda" or args.train_amp
    if amp:
        with exact_float32(), torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            amp_err = abs(loss_of(backbone, x).float().item() - lo.item()) / max(abs(lo.item()), 1e-30)
        fns["lipsim bf16 autocast"] = step(backbone, opt_o, x, amp=True)
    if not (loss_err <= REL_TOL and grad_err <= GRAD_TOL):
        notes.append(f"{arch}: training REFUSED: loss rel err {loss_err:.1e}, grad rel err {grad_err:.1e}")
        return
    times = interleaved(fns, args.train_repeats, args.warmup, device)
    base_med = statistics.median(times["baseline"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            dict(
                task="train",
                arch=arch,
                impl=name,
                precision="bf16 autocast" if name == "lipsim bf16 autocast" else "fp32",
                batch=batch,
                img_s=batch / med,
                speedup=base_med / med,
                spread=f"{batch / max(ts):.3g}-{batch / min(ts):.3g}",
                check=(
                    "reference"
                    if name == "baseline"
                    else f"loss rel {amp_err:.0e} vs fp32"
                    if name == "lipsim bf16 autocast"
                    else f"loss {loss_err:.0e} grad {grad_err:.0e}"
                ),
            )
        )


def bench_dreamsim(batch: int, args, device: torch.device, rows: list, notes: list) -> None:
    if device.type != "cuda" and not args.dreamsim_on_cpu:
        notes.append(
            "DreamSim-shaped ViT ensemble: skipped on CPU (GPU rows only; --dreamsim-on-cpu forces it)"
        )
        return
    try:
        import timm

        def vit(patch):
            return timm.create_model(f"vit_base_patch{patch}_224", pretrained=False, num_classes=0)

        source = f"timm {timm.__version__}"
    except ImportError:
        try:
            import torchvision
        except ImportError:
            notes.append("DreamSim-shaped ViT ensemble: skipped (neither timm nor torchvision installed)")
            return

        def vit(patch):
            m = getattr(torchvision.models, f"vit_b_{patch}")(weights=None)
            m.heads = nn.Identity()
            return m

        source = f"torchvision {torchvision.__version__} (timm not installed)"
    nets = [vit(p).to(device).eval() for p in args.dreamsim_patches]
    x = torch.rand((batch, 3, 224, 224), device=device)

    def run(dtype):
        def go_():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for n in nets:
                    n(x)

        return go_

    times = interleaved({"fp32": run(torch.float32), "bf16": run(torch.bfloat16)}, args.repeats, 1, device)
    name = "+".join(f"ViT-B/{p}" for p in args.dreamsim_patches)
    for prec, ts in times.items():
        rows.append(
            dict(
                task="embed",
                arch="dreamsim-shaped",
                impl=name,
                precision=prec if prec == "fp32" else "bf16 autocast",
                batch=batch,
                img_s=batch / statistics.median(ts),
                speedup=float("nan"),
                spread=f"{batch / max(ts):.3g}-{batch / min(ts):.3g}",
                check="random weights",
            )
        )
    notes.append(f"DreamSim-shaped ensemble built with {source}, random weights")


# -- memory (CPU): one subprocess per configuration, peak RSS ---------------------------------


#: the rows a memory probe can rebuild in a fresh process (CPU); others get no peak RSS
PROBED = {
    "embed": ("baseline", "lipsim plain", "lipsim fast", "lipsim bf16", "numpy engine"),
    "train": ("baseline", "lipsim layer-by-layer", "lipsim", "lipsim bf16 autocast"),
}


def memory_probe(spec: dict) -> dict:
    """Runs in a child process: builds one configuration (the row's implementation, as the
    timing built it), runs it once, reports peak RSS."""
    torch.set_num_threads(spec["threads"])
    impl, task = spec["impl"], spec["task"]
    if impl not in PROBED[task]:
        raise ValueError(f"no memory probe for {task} row {impl!r}")
    model = make_model(spec["arch"], torch.device("cpu"))
    x = torch.rand((spec["batch"], 3, 224, 224))
    # SLL convolutions train as one autograd node by default; the layer-by-layer row without it
    use_fused_training(model, impl != "lipsim layer-by-layer")
    amp = impl == "lipsim bf16 autocast"
    if impl == "baseline":
        net = baseline_like(model)
        del model
    elif impl == "numpy engine":
        from lipsim.numpy_engine import NumpyLipSim

        state = {k: v.detach().numpy() for k, v in model.backbone.state_dict().items()}
        twin = NumpyLipSim(model.config, state, embedding=model.embedding)
        del model
    else:
        net = model.backbone
    if task == "embed":
        if impl == "baseline":
            fn = lambda: net.requires_grad_(False).embed(x)  # noqa: E731
        elif impl == "numpy engine":
            x_np = x.numpy()
            fn = lambda: twin.embed(x_np)  # noqa: E731
        elif impl == "lipsim bf16":
            fn = lambda: model.freeze().embed_fast(x)  # noqa: E731
        elif impl == "lipsim plain":
            fn = lambda: normalise(model.backbone(x), model.embedding)  # noqa: E731
        else:
            fn = lambda: model.freeze().embed(x)  # noqa: E731
    else:
        net.train().requires_grad_(True)
        opt = torch.optim.Adam(net.parameters(), lr=1e-5)

        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = net(x).float().square().mean()
            loss.backward()
            opt.step()

    before = _peak_rss_mib()
    with torch.no_grad() if task == "embed" else torch.enable_grad(), exact_float32():
        fn()
    return {"rss_before_mib": before, "rss_peak_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB. VmHWM belongs to the address space, so
    it starts afresh at exec; ru_maxrss would carry the parent's peak over (fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(rows: list, args) -> None:
    for row in rows:
        if row["arch"] == "dreamsim-shaped" or row["impl"] not in PROBED[row["task"]]:
            continue
        spec = dict(
            arch=row["arch"], impl=row["impl"], task=row["task"], batch=row["batch"], threads=args.threads
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--_probe", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        try:
            row["peak_rss_mib"] = json.loads(proc.stdout.strip().splitlines()[-1])["rss_peak_mib"]
        except (IndexError, ValueError, KeyError):
            row["peak_rss_mib"] = float("nan")


# -- the command line (CPU) --------------------------------------------------------------------


def _images(tmp: Path) -> tuple[list[str], str]:
    assets = Path(lipsim.__file__).parent / "assets"
    jpgs = sorted(assets.glob("*.jpg"))
    if len(jpgs) >= 2:
        return [str(jpgs[0]), str(jpgs[1])], f"packaged assets {jpgs[0].name}, {jpgs[1].name}"
    from PIL import Image

    gen = torch.Generator().manual_seed(4)
    paths = []
    for i in range(2):
        arr = (torch.rand((256, 320, 3), generator=gen) * 255).to(torch.uint8).numpy()
        p = tmp / f"gen{i}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    return paths, "two generated 320×256 JPEGs (no packaged assets)"


def _wall(cmd: list[str], env: dict, repeats: int) -> tuple[float, str]:
    times, err = [], ""
    for _ in range(repeats):
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        times.append(time.perf_counter() - t)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return statistics.median(times), err


def bench_cli(args, cli_rows: list, notes: list) -> None:
    from lipsim.checkpoints import default_model_path

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.model:
        model_src, label = args.model, f"--model {args.model}"
    elif default_model_path().exists():
        model_src, label = "default", "the packaged default model"
    else:
        model_src = f"arch:{args.default_arch}"
        label = f"--model {model_src} (no packaged default model in this installation)"
    with tempfile.TemporaryDirectory() as tmp:
        (a, b), img_label = _images(Path(tmp))
        py = sys.executable
        distance = [py, "-m", "lipsim", "distance", a, b, "--model", model_src]
        cmds = [
            ("python -c pass", [py, "-c", "pass"]),
            ("python -c 'import numpy, PIL.Image'", [py, "-c", "import numpy, PIL.Image"]),
            ("python -c 'import torch'", [py, "-c", "import torch"]),
            ("python -c 'import lipsim'", [py, "-c", "import lipsim"]),
            ("python -c 'import lipsim.cli'", [py, "-c", "import lipsim.cli"]),
            ("lipsim distance a.jpg b.jpg (default: --engine auto)", distance),
            ("lipsim distance a.jpg b.jpg --engine numpy", distance + ["--engine", "numpy"]),
            ("lipsim distance a.jpg b.jpg --engine torch", distance + ["--engine", "torch"]),
        ]
        for name, cmd in cmds:
            wall, err = _wall(cmd, env, args.cli_repeats)
            cli_rows.append({"command": name, "wall_s": wall, "error": err})
        # where the import time goes
        proc = subprocess.run(
            [py, "-X", "importtime", "-m", "lipsim", "distance", a, b, "--model", model_src],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        imports = []  # (cumulative us, nesting depth, module)
        for line in proc.stderr.splitlines():
            fields = line[len("import time:") :].split("|") if line.startswith("import time:") else []
            if len(fields) == 3 and fields[0].strip().isdigit():
                name = fields[2][1:]
                depth = (len(name) - len(name.lstrip(" "))) // 2
                imports.append((int(fields[1]), depth, name.strip()))
        notes.append(f"CLI: images = {img_label}; model = {label}; OMP_NUM_THREADS={args.threads}")
        shallow = sorted((i for i in imports if i[1] <= 1), reverse=True)[:8]
        notes.append(
            "CLI imports, cumulative ms (depth <= 1): "
            + ", ".join(f"{n} {c / 1000:.0f}" for c, _, n in shallow)
        )
        ours = sorted((i for i in imports if i[2].startswith("lipsim")), reverse=True)[:10]
        notes.append(
            "CLI imports of lipsim modules, cumulative ms: "
            + ", ".join(f"{n} {c / 1000:.0f}" for c, _, n in ours)
        )
    # in-process breakdown of the torch engine's work after imports
    from lipsim.cli import resolve_model

    t0 = time.perf_counter()
    model = resolve_model(model_src, "cpu")
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (a, b), _ = _images(Path(tmp))
        ia, ib = lipsim.load_image(a, size=model.input_size), lipsim.load_image(b, size=model.input_size)
    t2 = time.perf_counter()
    model(ia, ib)
    t3 = time.perf_counter()
    model.distance_interval(ia, ib, 36 / 255)
    t4 = time.perf_counter()
    model.freeze()(ia, ib)
    t5 = time.perf_counter()
    notes.append(
        f"CLI work after imports (in process, warm torch): build/load model {1e3 * (t1 - t0):.0f} ms, "
        f"decode 2 images {1e3 * (t2 - t1):.0f} ms, distance {1e3 * (t3 - t2):.0f} ms, "
        f"distance_interval (a second forward) {1e3 * (t4 - t3):.0f} ms; distance with a frozen engine "
        f"(first call, includes folding and packing) {1e3 * (t5 - t4):.0f} ms"
    )


# ---------------------------------------------------------------------------------------------


def print_table(rows: list, cli_rows: list, notes: list, header: dict) -> None:
    print()
    for k, v in header.items():
        print(f"{k:>12}: {v}")
    print()
    cols = [
        "task",
        "arch",
        "impl",
        "precision",
        "batch",
        "img/s",
        "vs baseline",
        "min-max img/s",
        "peak RSS",
        "check",
    ]
    table = []
    for r in rows:
        table.append(
            [
                r["task"],
                r["arch"],
                r["impl"],
                r["precision"],
                str(r["batch"]),
                f"{r['img_s']:.3g}",
                "-" if r["speedup"] != r["speedup"] else f"{r['speedup']:.2f}x",
                r["spread"],
                f"{r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else "-",
                r["check"],
            ]
        )
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))
    if cli_rows:
        print()
        for r in cli_rows:
            print(
                f"  {r['command']:<34} {r['wall_s']:.2f} s wall (median)"
                + (f"  ERROR: {r['error']}" if r["error"] else "")
            )
    print()
    for n in notes:
        print(f"note: {n}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 on CPU)")
    p.add_argument("--default-arch", default="s2d-compact", help="the default architecture to compare")
    p.add_argument("--archs", default=None, help="comma-separated architectures (default: small,DEFAULT)")
    p.add_argument("--batch", type=int, default=None, help="embedding batch (default 16 CPU / 256 GPU)")
    p.add_argument(
        "--batch-small", type=int, default=None, help="embedding batch of 'small' (default 4 CPU / 256 GPU)"
    )
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 8 CPU / 32 GPU)")
    p.add_argument(
        "--train-batch-small", type=int, default=None, help="training batch of 'small' (default 2 CPU)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-embed", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-cli", action="store_true")
    p.add_argument("--cli-repeats", type=int, default=3)
    p.add_argument(
        "--model", default=None, help="model for the CLI timing (default: packaged, else arch:DEFAULT)"
    )
    p.add_argument(
        "--train-channels-last", action="store_true", help="also time training on channels-last input"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile of the default arch (minutes of compiling)",
    )
    p.add_argument(
        "--train-amp", action="store_true", help="also time bf16-autocast training on CPU (always on GPUs)"
    )
    p.add_argument("--dreamsim-on-cpu", action="store_true")
    p.add_argument("--no-numpy", action="store_true", help="skip the NumPy-engine rows (CPU)")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton-kernel rows (CUDA)")
    p.add_argument("--dreamsim-patches", default="16,32,32", help="ViT-B patch sizes of the ensemble")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, 2 repeats, no memory/CLI")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._probe:
        print(json.dumps(memory_probe(json.loads(args._probe))))
        return 0
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.threads = args.threads or (torch.get_num_threads() if gpu else 2)
    torch.set_num_threads(args.threads)
    args.dreamsim_patches = [int(s) for s in args.dreamsim_patches.split(",")]
    if args.quick:
        args.repeats, args.train_repeats, args.no_memory, args.no_cli = 2, 2, True, True
        args.batch = args.batch or 2
        args.batch_small = args.batch_small or 1
        args.train_batch = args.train_batch or 2
        args.train_batch_small = args.train_batch_small or 1
    batch = args.batch or (256 if gpu else 16)
    batch_small = args.batch_small or (256 if gpu else 4)
    train_batch = args.train_batch or (32 if gpu else 8)
    train_batch_small = args.train_batch_small or (16 if gpu else 2)
    archs = args.archs.split(",") if args.archs else ["small", args.default_arch]
    for a in archs:
        get_config(a)

    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "load": "{:.2f} {:.2f} {:.2f} (1/5/15 min)".format(*os.getloadavg()),
        "env": " ".join(
            f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ
        )
        or "(no OMP_* settings)",
    }
    rows: list = []
    cli_rows: list = []
    notes: list = []
    shown = 0

    def save(partial: bool) -> None:
        """Each finished section's rows go to stderr and (with --json) to the file at once, so
        that a run stopped by a time limit keeps what it measured."""
        nonlocal shown
        for r in rows[shown:]:
            print(
                f"  {r['task']} {r['arch']} {r['impl']} {r['precision']} batch {r['batch']}: "
                f"{r['img_s']:.4g} img/s ({r['check']})",
                file=sys.stderr,
                flush=True,
            )
        shown = len(rows)
        if args.json:
            doc = {"header": header, "rows": rows, "cli": cli_rows, "notes": notes, "partial": partial}
            Path(args.json).write_text(json.dumps(doc, indent=1, default=str))

    for arch in [] if args.no_embed else archs:
        b = batch_small if arch == "small" else batch
        print(f"[embed] {arch} batch {b} ...", file=sys.stderr, flush=True)
        bench_embedding(arch, b, args, device, rows, notes)
        save(True)
    if not args.no_train:
        for arch in archs:
            b = train_batch_small if arch == "small" else train_batch
            print(f"[train] {arch} batch {b} ...", file=sys.stderr, flush=True)
            bench_training(arch, b, args, device, rows, notes)
            save(True)
    bench_dreamsim(batch, args, device, rows, notes)
    save(True)
    if not gpu and not args.no_memory:
        print("[memory] one subprocess per row ...", file=sys.stderr, flush=True)
        measure_memory(rows, args)
        notes.append(
            "peak RSS: VmHWM of a fresh process that built the model and ran one call (python + torch "
            "+ weights + activations; tracemalloc does not see torch's C++ allocations)"
        )
    if not gpu and not args.no_cli:
        print("[cli] subprocess timings ...", file=sys.stderr, flush=True)
        bench_cli(args, cli_rows, notes)
    if gpu:
        notes.append("CLI timing and peak RSS: CPU runs only")
    save(True)
    if args.compile and not args.no_embed:
        print(f"[compile] {args.default_arch} batch {batch} ...", file=sys.stderr, flush=True)
        bench_compiled(args.default_arch, batch, args, device, rows, notes)
    header["load after"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    save(False)
    print_table(rows, cli_rows, notes, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
