"""Data commands: make-2afc (synthetic 2AFC triplets with known answers, NIGHT layout)."""

from __future__ import annotations

from . import emit


def cmd_make_2afc(args) -> int:
    from lipsim.data.synthetic import make_2afc

    families = None
    if args.families:
        families = [f.strip() for item in args.families for f in item.split(",") if f.strip()]
    summary = make_2afc(
        args.images,
        args.out,
        n=args.n,
        seed=args.seed,
        split=args.split,
        families=families,
        size=args.size,
        overwrite=args.overwrite,
    )
    n, split, size, seed = summary["n"], summary["split"], summary["size"], summary["seed"]
    per_family = ", ".join(f"{name} {count}" for name, count in summary["families"].items())
    text = (
        f"wrote {n} triplets ({split} split, {size}px, seed {seed}, right_vote mean "
        f"{summary['right_vote_mean']:.2f}) from {summary['photos']} photos to {summary['out']}\n"
        f"per family: {per_family}"
    )
    emit(args, summary, text)
    return 0


#: the names of lipsim.data.synthetic.FAMILIES, kept here so that building the parser does not
#: import torchvision (about a second of start-up for every lipsim command); a test checks them
FAMILY_NAMES = ("view", "mirror", "blur", "noise", "jpeg", "color", "contrast", "geometric", "shift-vs-noise")


def register(subparsers) -> None:
    FAMILIES = FAMILY_NAMES  # noqa: N806

    p = subparsers.add_parser(
        "make-2afc",
        help="write synthetic 2AFC triplets with known answers (NIGHT layout) from a photo folder",
        description="Builds 2AFC triplets whose answer is known by construction from random crops of "
        "the photos in --images (at least 2), and writes them in the NIGHT layout (data.csv, ref/, "
        "distort/) with a 'family' column. Families: " + ", ".join(FAMILIES) + ".",
    )
    p.add_argument("--images", required=True, metavar="DIR", help="folder of photos (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--n", type=int, default=200, help="number of triplets (default 200)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed, default 0 (the output depends only on it and the photos)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="value of the split column (default test)",
    )
    p.add_argument(
        "--families",
        nargs="+",
        metavar="NAME",
        help="families to generate, space- or comma-separated (default: all), assigned round-robin",
    )
    p.add_argument("--size", type=int, default=224, help="side of the written PNGs in pixels (default 224)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data.csv in --out")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=cmd_make_2afc)
