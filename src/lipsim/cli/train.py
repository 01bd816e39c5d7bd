"""``lipsim train distill`` and ``lipsim train finetune``: thin parsers over :mod:`lipsim.train`.

Under ``torchrun --nproc_per_node N -m lipsim train ...`` (or ``torchrun --no-python lipsim
train ...``) every process runs the same command; only rank 0 logs, writes files and prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import CliError, emit

_LOOP_HELP = (
    "Run folder: config.json, metrics.jsonl, loss.png, checkpoints/last.pt (atomic, every "
    "--checkpoint-every steps and on Ctrl-C/SIGTERM) and, at the end, model.safetensors. "
    "Under torchrun (WORLD_SIZE > 1) it runs DistributedDataParallel; --batch-size is the global batch."
)


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _default_workers() -> int:
    """4 loader workers, capped by the CPUs this process may use (torch warns above that count)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("lipsim.train")
    rank = int(os.environ.get("RANK", "0") or 0)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if (quiet or rank != 0) else logging.INFO)


def _int_at_least(low: int, what: str):
    """An argparse type: an integer ≥ ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _betas(text: str) -> tuple[float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.5,0.9, got {text!r}") from None
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.5,0.9, got {text!r}")
    return parts  # type: ignore[return-value]


#: lipsim.train.loop.SCHEDULES and AMP_MODES, kept here so that building the parser does not import
#: torch (two seconds of start-up for every lipsim command); a test checks that they agree
SCHEDULES = ("cosine", "triangular", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def _add_loop_args(p: argparse.ArgumentParser, lr: float, length_help: str) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (created)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="number of optimiser steps")
    length.add_argument(
        "--epochs", type=_positive_int, help=f"number of passes over the data ({length_help})"
    )
    p.add_argument("--batch-size", type=_positive_int, default=32, help="GLOBAL batch size (default 32)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate of Adam (default {lr:g})")
    p.add_argument("--betas", type=_betas, default=(0.5, 0.9), help="Adam betas (default 0.5,0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay (default 0)")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="cosine: linear warm-up then cosine to 0 (default); triangular: the paper-time "
        "0→lr (40%%)→lr/20 (80%%)→0; constant: warm-up then flat",
    )
    p.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=None,
        help="warm-up steps (default min(2000, 10%% of steps))",
    )
    p.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip the gradient ℓ2 norm")
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="autocast on CUDA: auto = bf16 where supported, else fp16 with loss scaling (CPU: always off)",
    )
    p.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed of init, data order, views (default 0)"
    )
    p.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=_default_workers(),
        help="data loader workers per process (default: 4, or fewer on a machine with fewer CPUs)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=1000,
        help="steps between checkpoints (0: end only)",
    )
    p.add_argument(
        "--log-every", type=_positive_int, default=10, help="steps between metrics lines (default 10)"
    )
    p.add_argument(
        "--device", default="auto", help="auto (default), cpu, cuda, cuda:N (torchrun: local rank)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from checkpoints/last.pt (same options)",
    )
    p.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        metavar="N",
        help="checkpoint and stop after N steps of this session (for time-limited jobs; --resume continues)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _loop_kwargs(args) -> dict:
    return dict(
        out=args.out,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        betas=tuple(args.betas),
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup=args.warmup,
        clip_grad=args.clip_grad,
        amp=args.amp,
        seed=args.seed,
        num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        device=args.device,
        resume=args.resume,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )


def _report(args, result) -> int:
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0 if not result.signal else 128 + int(result.signal)
    payload = result.as_dict()
    if result.interrupted:
        text = (
            f"stopped at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint}\n"
            f"continue with the same command plus --resume"
        )
    else:
        loss = "n/a" if result.loss is None else f"{result.loss:.6g}"
        text = (
            f"wrote {result.model_path} ({result.step} steps, last logged loss {loss}, "
            f"{result.seconds:.1f} s this session)"
        )
    emit(args, payload, text)
    return 128 + int(result.signal) if result.signal else 0


def cmd_distill(args) -> int:
    from lipsim.train import DistillConfig, run_distill

    _setup_logging(args.quiet)
    if args.steps is None and args.epochs is None:
        raise CliError("give the run length with --steps or --epochs (the published recipe: --epochs 40)")
    config = DistillConfig(
        data_dir=args.data_dir,
        teacher=args.teacher,
        arch=args.arch,
        views=args.views,
        target_scale=args.target_scale,
        teacher_dir=args.teacher_dir,
        **_loop_kwargs(args),
    )
    return _report(args, run_distill(config))


def cmd_finetune(args) -> int:
    from lipsim.train import FinetuneConfig, run_finetune

    _setup_logging(args.quiet)
    categories = None
    if args.categories:
        categories = tuple(c.strip() for part in args.categories for c in part.split(",") if c.strip())
        if args.dataset != "bapps":
            raise CliError("--categories applies to --dataset bapps only")
    config = FinetuneConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        init=args.init,
        margin=args.margin,
        split=args.split,
        min_votes=args.min_votes,
        categories=categories,
        init_optimizer=args.init_optimizer,
        **_loop_kwargs(args),
    )
    return _report(args, run_finetune(config))


def register(subparsers: argparse._SubParsersAction) -> None:
    from lipsim.spec import list_archs

    train = subparsers.add_parser(
        "train", help="train a model: distill a teacher, then fine-tune on 2AFC data"
    )
    sub = train.add_subparsers(dest="train_command", metavar="STAGE")
    train.set_defaults(func=lambda args: (train.print_help(), 2)[1])

    p = sub.add_parser(
        "distill",
        help="stage 1: regress the student's features onto a teacher's embeddings",
        description="Distils a teacher into a 1-Lipschitz student: loss = mean over the two views of "
        "RMSE(f(view), teacher(view a)); Adam betas (0.5, 0.9), lr 0.01, cosine schedule with warm-up. "
        + _LOOP_HELP,
    )
    p.add_argument(
        "--data-dir", required=True, metavar="DIR", help="folder of training images (searched recursively)"
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="offline-ensemble (alias ensemble), mobilenet_v2, mobilenet_v2-multistage, efficientnet_lite0, "
        "dreamsim, an embedding-cache folder, or py:module:factory",
    )
    p.add_argument("--arch", required=True, help=f"student architecture ({', '.join(list_archs())})")
    p.add_argument(
        "--views",
        choices=("published", "random-resized", "single"),
        default="published",
        help="published: centre crop 224 at native resolution (ImageNet) and a colour-jittered copy; "
        "random-resized: random resized crops (small photo folders); single: the centre crop only "
        "(half the compute, no colour invariance taught)",
    )
    p.add_argument(
        "--target-scale", type=float, default=1.0, help="multiply teacher embeddings by this factor"
    )
    p.add_argument(
        "--teacher-dir", default=None, metavar="DIR", help="folder of the teacher's weights (cache_dir)"
    )
    _add_loop_args(p, lr=0.01, length_help="required: --steps or --epochs")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "finetune",
        help="stage 2: hinge loss on 2AFC triplets (NIGHT, BAPPS, make-2afc folders)",
        description="Fine-tunes with L = Σ_batch max(0, margin - (d0 - d1)·(2·round(y) - 1)) on the "
        "appended-constant embedding (a published checkpoint is switched to it). Defaults: 1 epoch, "
        "batch 32, margin 0.2, Adam betas (0.5, 0.9) with fresh moments, lr 1e-3, cosine with warm-up. "
        + _LOOP_HELP,
    )
    p.add_argument("--dataset", required=True, choices=("night", "bapps"), help="folder layout of --data-dir")
    p.add_argument(
        "--data-dir", required=True, metavar="DIR", help="NIGHT root (holds data.csv) or BAPPS root"
    )
    p.add_argument(
        "--init",
        required=True,
        metavar="MODEL",
        help="model.safetensors, a run folder, a training checkpoint last.pt, a published .pth, or arch:NAME",
    )
    p.add_argument(
        "--margin", type=float, default=0.2, help="hinge margin (published: 0.2 or 0.5; default 0.2)"
    )
    p.add_argument("--split", default="train", help="dataset split to train on (default train)")
    p.add_argument(
        "--min-votes", type=float, default=6, help="NIGHT: keep triplets with at least this many votes"
    )
    p.add_argument(
        "--categories", nargs="+", default=None, help="BAPPS categories (default: all of the split)"
    )
    p.add_argument(
        "--init-optimizer",
        action="store_true",
        help="start from the Adam moments stored with --init (the published recipe); "
        "default: a fresh optimiser",
    )
    _add_loop_args(p, lr=1e-3, length_help="default 1")
    p.set_defaults(func=cmd_finetune)
