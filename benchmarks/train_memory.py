"""Peak memory of one training forward + backward, fused SLL-convolution node against layer by layer.

Each configuration runs in a fresh process (``ru_maxrss`` only grows), e.g.::

    .venv/bin/python benchmarks/train_memory.py s2d-lite 32
    .venv/bin/python benchmarks/train_memory.py small 2

prints the resident-memory growth of a forward + backward above the built model, both ways.
"""

from __future__ import annotations

import resource
import subprocess
import sys


def _one(arch: str, fused: bool, batch: int) -> None:
    import torch

    import lipsim
    from lipsim.layers import use_fused_training

    model = lipsim.create_model(arch, seed=0)
    use_fused_training(model, fused)
    backbone = model.backbone.train().requires_grad_(True)
    x = torch.rand(batch, 3, 224, 224)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    backbone(x).square().mean().backward()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    how = "fused node" if fused else "layer by layer"
    print(f"{arch} batch {batch} {how}: {grown:.0f} MiB above the model")


def main() -> None:
    arch, batch = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3:
        _one(arch, sys.argv[3] == "fused", batch)
        return
    for mode in ("layer-by-layer", "fused"):
        subprocess.run([sys.executable, __file__, arch, str(batch), mode], check=True)


if __name__ == "__main__":
    main()
