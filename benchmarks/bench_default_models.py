"""Certified float32 embedding throughput of two model files in the same run (frozen engine).

    python benchmarks/bench_default_models.py --models OLD.safetensors,default --threads 2

Alternates the models for --rounds rounds and prints the median img/s of each; every model's
frozen embedding is first checked against its unfrozen one (relative 1e-5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lipsim


def throughput(model, x: torch.Tensor, repeats: int) -> float:
    model.embed(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.embed(x)
    return repeats * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default", help="comma-separated model sources")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 224, 224)
    models = {}
    for source in args.models.split(","):
        model = lipsim.load(None if source == "default" else source)
        frozen = model.freeze()
        ref, got = model.embed(x[:2]), frozen.embed(x[:2])
        err = float((ref - got).abs().max() / ref.abs().max())
        if err > 1e-5:
            raise SystemExit(f"{source}: frozen embedding differs from the layers by {err:.2e}")
        models[source] = frozen
    rates = {s: [] for s in models}
    for _ in range(args.rounds):
        for source, model in models.items():
            rates[source].append(throughput(model, x, args.repeats))
    for source, r in rates.items():
        print(f"{source:40s} {statistics.median(r):7.1f} img/s  (rounds: {', '.join(f'{v:.1f}' for v in r)})")


if __name__ == "__main__":
    main()
