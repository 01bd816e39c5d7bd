"""Robust retrieval demo (offline): does a perturbed view of a photo still find the photo?

Our protocol, inspired by the paper's COCO retrieval experiment (whose exact protocol could not be
verified; docs/retrieval.md describes this one):

* gallery = the photos (each resized to 224×224 by ``lipsim.load_image``);
* queries = other views of them: a random crop (60–90 % of the area), a horizontal flip half of
  the time and a brightness/contrast/saturation jitter, resized to 224×224;
* top-1 accuracy = the query's nearest gallery photo is its own source photo;
* under attack: ℓ2-PGD on the query (in [0, 1] pixel space) maximising the margin of the best
  wrong photo over the right one, for each ε; a query counts as correct if the attack fails;
* certified (LipSim only): the query's top-1 is right *and* its certified radius (exact search
  over the whole gallery, :meth:`lipsim.retrieval.Index.search`) exceeds ε, so no attack of that
  size can succeed whatever its strength.

The teacher ("teacher:mobilenet_v2" by default) is attacked the same way on its own normalised
embeddings; it has no certificate. Writes ``retrieval_demo.json`` and ``retrieval_demo.png``.

    python scripts/retrieval_demo.py --model run/model.safetensors
    python scripts/retrieval_demo.py --model arch:tiny-s2d --steps 10     # smoke run, random weights
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import lipsim
from lipsim.checkpoints import default_model_path
from lipsim.images import load_image
from lipsim.retrieval import Index, list_images
from lipsim.retrieval.attack import attack_top1

HELDOUT = Path("data/corpus/heldout/photos")
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)


def bundled_photos() -> list[Path]:
    """Colour photos shipped inside the scikit-image (and matplotlib) wheels."""
    found = []
    try:
        import skimage

        root = Path(skimage.__file__).parent / "data"
        found += [root / name for name in SKIMAGE_PHOTOS if (root / name).exists()]
    except ImportError:
        pass
    try:
        import matplotlib

        hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if hopper.exists():
            found.append(hopper)
    except ImportError:
        pass
    return found


def open_rgb(path: Path) -> Image.Image:
    img = Image.open(path)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def make_view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (60-90 % of the area, the photo's aspect), maybe flipped, colour-jittered."""
    w, h = img.size
    scale = rng.uniform(0.6, 0.9)
    cw, ch = max(1, int(w * np.sqrt(scale))), max(1, int(h * np.sqrt(scale)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(view).enhance(rng.uniform(0.8, 1.2))


def teacher_embedder(teacher):
    """Unit embeddings of a teacher, differentiable. ``Teacher.forward`` runs under no_grad (it
    produces distillation targets), so the attack goes through its ``embed_checked`` hook; PGD
    keeps the images in [0, 1], the range that ``forward`` would have checked."""
    inner = getattr(teacher, "embed_checked", None) or teacher

    def embed(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(inner(x).float().reshape(x.shape[0], -1), dim=1)

    return embed


def top1_of(embed, queries: torch.Tensor, gallery: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        q = torch.cat([embed(queries[i : i + batch]) for i in range(0, len(queries), batch)])
    return (q.double() @ gallery.double().T).argmax(dim=1)


def evaluate(name, embed, gallery_x, queries, labels, eps_list, args) -> dict:
    """Clean and attacked top-1 accuracy of one metric (``embed`` -> unit embeddings)."""
    with torch.no_grad():
        gallery = torch.cat(
            [embed(gallery_x[i : i + args.batch]) for i in range(0, len(gallery_x), args.batch)]
        )
    clean = top1_of(embed, queries, gallery, args.batch) == labels
    attacked = {}
    for eps in eps_list:
        t0 = time.time()
        ok = clean.clone()
        for i in range(0, len(queries), args.batch):
            sl = slice(i, i + args.batch)
            x_adv, _ = attack_top1(
                embed, queries[sl], gallery, labels[sl], eps, steps=args.steps, restarts=args.restarts
            )
            ok[sl] &= top1_of(embed, x_adv, gallery, args.batch) == labels[sl]
        attacked[str(eps)] = float(ok.float().mean())
        print(f"  {name}: eps {eps:g}: top-1 under attack {attacked[str(eps)]:.3f} ({time.time() - t0:.0f}s)")
    return {"clean_top1": float(clean.float().mean()), "attacked_top1": attacked}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default=None, help=f"folder of photos (default {HELDOUT}, else bundled)")
    parser.add_argument("--model", default=None, help="LipSim model (default: the packaged one)")
    parser.add_argument("--teacher", default="mobilenet_v2", help="teacher name, or 'none'")
    parser.add_argument("--eps", default="0.5,1,2,4", help="comma-separated ℓ2 budgets")
    parser.add_argument("--views", type=int, default=2, help="query views per photo")
    parser.add_argument("--max-photos", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20, help="PGD steps")
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/retrieval_demo", help="output folder")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    eps_list = [float(e) for e in args.eps.split(",") if e.strip()]

    if args.photos:
        root = Path(args.photos)
        paths = [root / p for p in list_images(root)]
    elif HELDOUT.is_dir() and list_images(HELDOUT):
        paths = [HELDOUT / p for p in list_images(HELDOUT)]
    else:
        print(f"{HELDOUT} not found: using the photos bundled with scikit-image/matplotlib", file=sys.stderr)
        paths = bundled_photos()
    paths = paths[: args.max_photos]
    if len(paths) < 2:
        print("error: need at least two photos", file=sys.stderr)
        return 1

    source = args.model
    if source is None:
        if not default_model_path().exists():
            print(
                "error: no packaged default model here; pass --model FILE (or arch:NAME for a smoke run)",
                file=sys.stderr,
            )
            return 1
        source = "default"
    if source.startswith("arch:"):
        model = lipsim.create_model(source[5:], seed=0).to(args.device).requires_grad_(False)
        print(
            "note: untrained architecture (random weights): the numbers are not perceptual", file=sys.stderr
        )
    else:
        model = lipsim.load(None if source == "default" else source, device=args.device)

    rng = np.random.default_rng(args.seed)
    photos = [open_rgb(p) for p in paths]
    gallery_x = torch.cat([load_image(img, size=model.input_size) for img in photos]).to(args.device)
    queries, labels = [], []
    for i, img in enumerate(photos):
        for _ in range(args.views):
            queries.append(load_image(make_view(img, rng), size=model.input_size))
            labels.append(i)
    queries = torch.cat(queries).to(args.device)
    labels = torch.tensor(labels, device=args.device)
    print(f"{len(paths)} photos, {len(queries)} query views, eps {eps_list}, PGD {args.steps} steps")

    report = {
        "protocol": "ours (not the paper's): gallery = photos, queries = crop/flip/jitter views, "
        "l2-PGD on the query maximising the best wrong photo's margin",
        "photos": [str(p) for p in paths],
        "n_queries": len(queries),
        "eps": eps_list,
        "attack": {"kind": "l2-PGD", "steps": args.steps, "restarts": args.restarts},
    }
    t0 = time.time()
    lip = evaluate("lipsim", model.embed, gallery_x, queries, labels, eps_list, args)
    index = Index(model)
    index.add(gallery_x, [str(p) for p in paths])
    results = index.search(queries, k=1, certify_k=len(paths))
    correct = np.array([int(r.ids[0]) == int(lbl) for r, lbl in zip(results, labels.tolist(), strict=True)])
    radii = np.array([r.certified_radius for r in results], dtype=np.float64)
    lip["certified_top1"] = {str(e): float(np.mean(correct & (radii > e))) for e in eps_list}
    lip["median_radius"] = float(np.median(radii))
    lip["model"] = source
    lip["embedding"] = model.embedding
    lip["seconds"] = round(time.time() - t0, 1)
    report["lipsim"] = lip
    print(
        f"  lipsim: clean {lip['clean_top1']:.3f}, certified {lip['certified_top1']}, "
        f"median radius {lip['median_radius']:.4f}"
    )

    if args.teacher.lower() != "none":
        try:
            from lipsim.teachers import get_teacher

            teacher = get_teacher(args.teacher, device=args.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        except Exception as exc:  # the teachers package or its weights may be missing
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"teacher {args.teacher!r} unavailable, skipped: {msg}", file=sys.stderr)
            report["teacher"] = {"name": args.teacher, "skipped": msg}
        else:
            t0 = time.time()
            report["teacher"] = {
                "name": args.teacher,
                **evaluate(
                    f"teacher:{args.teacher}",
                    teacher_embedder(teacher),
                    gallery_x,
                    queries,
                    labels,
                    eps_list,
                    args,
                ),
                "seconds": round(time.time() - t0, 1),
            }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_demo.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "retrieval_demo.png")
    print(f"wrote {out / 'retrieval_demo.json'} and {out / 'retrieval_demo.png'}")
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [0.0] + report["eps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    lip = report["lipsim"]
    ax.plot(
        eps,
        [lip["clean_top1"]] + [lip["attacked_top1"][str(e)] for e in report["eps"]],
        "o-",
        label="LipSim, under attack",
    )
    ax.plot(
        eps,
        [lip["clean_top1"]] + [lip["certified_top1"][str(e)] for e in report["eps"]],
        "s--",
        label="LipSim, certified",
    )
    teacher = report.get("teacher", {})
    if "clean_top1" in teacher:
        ax.plot(
            eps,
            [teacher["clean_top1"]] + [teacher["attacked_top1"][str(e)] for e in report["eps"]],
            "^-",
            label=f"teacher {teacher['name']}, under attack",
        )
    ax.set_xlabel("ℓ2 budget ε on the query ([0,1] pixels, 224×224)")
    ax.set_ylabel("top-1 retrieval accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{len(report['photos'])} photos, {report['n_queries']} query views")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
