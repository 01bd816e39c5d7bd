"""Retrieval: certified top-1 search, near-duplicate verdicts, the index on disk and the CLI.

The certificates are attacked with ℓ2-PGD. On random tiny LipSim models the bound is loose
(the network contracts far more than 1-Lipschitz allows), so an attack inside the radius could
never come close; the "pixel" model below makes the bound nearly attainable (its backbone copies
16 dark pixels, an isometry, so ‖[f; 1]‖ ≈ 1 and g moves almost as far as the input), and each
attack test also shows that the same attack *does* succeed just outside the radius.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lipsim
from lipsim import certify, fileio
from lipsim.archs import ArchConfig, LipschitzBackbone
from lipsim.cli import main
from lipsim.layers import Flatten, SLLLinear, Truncate
from lipsim.model import LipSim
from lipsim.retrieval import (
    Index,
    IndexFormatError,
    ModelIdentity,
    ModelMismatchError,
    find_near_duplicates,
    index_folder,
    pair_threshold_radius,
    search_allowance,
    top1_radius,
)
from lipsim.retrieval import build as build_mod
from lipsim.retrieval import index as index_mod
from lipsim.retrieval.attack import attack_threshold, attack_top1

NPIX = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests use one thread (small tensors); the setting is restored for the other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- helpers ------------------------------------------------------------------------------------
def pixel_model(embedding: str) -> LipSim:
    """f(x) = the first 16 red pixels of the top row (an isometry on them), then an SLL linear
    layer with zero weights (the identity; it gives the model a parameter)."""
    cfg = ArchConfig("test-pixels", "s2d", out_dim=NPIX, stages=((0, 1),))
    lin = SLLLinear(NPIX, 4)
    with torch.no_grad():
        lin.weight.zero_()
    backbone = LipschitzBackbone(cfg, OrderedDict(flat=Flatten(), trunc=Truncate(NPIX), head=lin))
    return LipSim(backbone, embedding=embedding).eval().requires_grad_(False)


def pixel_images(values: torch.Tensor) -> torch.Tensor:
    x = torch.full((values.shape[0], 3, 224, 224), 0.5)
    x[:, 0, 0, :NPIX] = values
    return x


def pixel_gallery(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    gallery = 0.02 + 0.1 * torch.rand((6, NPIX), generator=g)
    queries = 0.7 * gallery[:3] + 0.3 * gallery[3:6]
    return pixel_images(gallery), pixel_images(queries)


def smooth_images(n: int, seed: int, res: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, res, res), generator=g)
    return F.interpolate(low, size=224, mode="bilinear", align_corners=False).clamp(0, 1)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def true_top1(model, x: torch.Tensor, gallery_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest item by an independent float64 recomputation, and whether it is strictly nearest."""
    with torch.no_grad():
        d = 1.0 - model.embed(x).double() @ gallery_emb.double().T
    best = d.argmin(dim=1)
    second = d.scatter(1, best.view(-1, 1), float("inf")).min(dim=1).values
    return best, second > d.gather(1, best.view(-1, 1)).squeeze(1)


# -- the radius itself --------------------------------------------------------------------------
def test_top1_radius_refuses_a_plain_model_without_its_norm():
    d, g = np.array([0.1, 0.3]), np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="needs ref_norm"):
        top1_radius(d, g, embedding="plain")
    with pytest.raises(ValueError, match="unknown embedding"):
        top1_radius(d, g, ref_norm=2.0, embedding="cosine")
    # append mode with ‖f(q)‖: the norm-aware radius, never below the one without it
    assert top1_radius(d, g, ref_norm=5.0, embedding="append") > top1_radius(d, g)


def test_top1_radius_formula_ties_and_bound_term():
    e = unit(np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0.6, 0, 0.8]]))
    q = unit(np.array([[1.0, 0.1, 0.05]]))[0]
    d = 1.0 - e.astype(np.float64) @ q.astype(np.float64)
    assert np.all(np.diff(d) > 0)
    expect = min((d[b] - d[0] - certify.FLOAT_SLACK) / np.linalg.norm(e[0] - e[b]) for b in (1, 2))
    assert top1_radius(d, e) == pytest.approx(expect, rel=1e-5)
    # the unseen rest of the gallery: rivals at distance >= beyond, separation <= 2
    beyond = d[1] + 0.001
    with_rest = top1_radius(d[:2], e[:2], beyond=beyond)
    assert with_rest == pytest.approx(min(expect, (beyond - d[0] - certify.FLOAT_SLACK) / 2), rel=1e-5)
    assert top1_radius(d[:1], e[:1]) == math.inf  # one item and nothing else: nothing can change
    assert top1_radius(d[:1], e[:1], beyond=d[0]) == 0.0
    assert top1_radius(np.array([0.2, 0.2]), e[:2]) == 0.0  # a tie certifies nothing
    with pytest.raises(ValueError):
        top1_radius(d[::-1].copy(), e[::-1].copy())
    # plain mode uses the norm-aware radius, never the optimistic m/B
    plain = top1_radius(d, e, ref_norm=0.5)
    assert 0 < plain < expect


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 40),
    dim=st.integers(3, 12),
    certify_k=st.integers(1, 40),
    seed=st.integers(0, 10_000),
)
def test_certified_top1_holds_for_every_embedding_move_inside_the_radius(n, dim, certify_k, seed):
    """For g 1-Lipschitz, a query perturbation of norm ε moves g(q) by at most ε. The worst such
    move against rival b is along g(b) - g(a); none of norm 0.999·radius may change the top-1,
    whatever rival, whether or not b was among the examined candidates."""
    rng = np.random.default_rng(seed)
    gallery = unit(rng.normal(size=(n, dim)))
    query = unit(rng.normal(size=(1, dim)))
    index = Index(dim=dim)
    index.add(gallery)
    (res,) = index.search(query, k=1, certify_k=certify_k)
    radius = res.certified_radius
    a = int(res.ids[0])
    g64 = gallery.astype(np.float64)
    direct = 1.0 - g64 @ query[0].astype(np.float64)
    assert direct[a] == direct.min()
    for b in range(n):
        if b == a:
            continue
        u = (g64[b] - g64[a]) / np.linalg.norm(g64[b] - g64[a])
        moved = query[0].astype(np.float64) + 0.999 * radius * u
        dist = 1.0 - g64 @ moved
        assert dist.argmin() == a and np.sum(dist <= dist[a]) == 1
    if certify_k >= n:  # no bound term: the radius is the exact binding rival's, so it is tight
        margins = direct - direct[a]
        margins[a] = np.inf
        ratios = margins / np.linalg.norm(g64 - g64[a], axis=1).clip(1e-300)
        b = int(np.argmin(ratios))
        assume(margins[b] > 5e-3)  # the float slack (1e-5) is then under 0.2 % of the margin
        u = (g64[b] - g64[a]) / np.linalg.norm(g64[b] - g64[a])
        moved = query[0].astype(np.float64) + 1.01 * radius * u
        dist = 1.0 - g64 @ moved
        assert dist[b] < dist[a]  # just outside the radius the top-1 does change


def test_search_allowance_covers_float32_inner_products():
    import faiss

    rng = np.random.default_rng(0)
    xb = unit(rng.normal(size=(3000, 1025)))
    xq = unit(rng.normal(size=(20, 1025)))
    index = faiss.IndexFlatIP(1025)
    index.add(xb)
    ip, ids = index.search(xq, 3000)
    exact = np.take_along_axis(xq.astype(np.float64) @ xb.astype(np.float64).T, ids, axis=1)
    assert np.abs(ip - exact).max() <= search_allowance(1025)
    assert search_allowance(1025) < 1e-4


# -- certified search under attack --------------------------------------------------------------
@pytest.mark.parametrize("embedding,outside", [("append", 1.5), ("plain", 1.2)])
def test_pgd_inside_the_radius_never_changes_the_top1(embedding, outside):
    model = pixel_model(embedding)
    gallery, queries = pixel_gallery()
    index = Index(model)
    index.add(gallery)
    g = torch.from_numpy(np.asarray(index.embeddings))
    for k, check_outside in ((len(gallery), True), (2, False)):
        results = index.search(queries, k=k, certify_k=k)
        top1 = torch.tensor([int(r.ids[0]) for r in results])
        radius = torch.tensor([r.certified_radius for r in results], dtype=torch.float32)
        assert bool((radius > 0).all())
        x_adv, _ = attack_top1(model.embed, queries, g, top1, 0.999 * radius, steps=100, restarts=2)
        moved = torch.linalg.vector_norm((x_adv - queries).flatten(1), dim=1)
        assert bool((moved <= radius).all())
        best, strict = true_top1(model, x_adv, g)
        assert torch.equal(best, top1) and bool(strict.all())
        if check_outside:
            x_adv, margin = attack_top1(model.embed, queries, g, top1, outside * radius, steps=100)
            best, _ = true_top1(model, x_adv, g)
            assert bool((best != top1).any()), "the attack should succeed just outside the radius"


def test_pgd_on_a_tiny_lipsim_inside_the_radius():
    model = lipsim.create_model("tiny-s2d", seed=0)
    gallery = smooth_images(5, 1)
    queries = (0.6 * gallery[:3] + 0.4 * smooth_images(3, 2)).clamp(0, 1)
    index = Index(model)
    index.add(gallery)
    g = torch.from_numpy(np.asarray(index.embeddings))
    results = index.search(queries, k=2, certify_k=2)
    top1 = torch.tensor([int(r.ids[0]) for r in results])
    radius = torch.tensor([r.certified_radius for r in results], dtype=torch.float32)
    assert bool((radius > 0).all())
    x_adv, margin = attack_top1(model.embed, queries, g, top1, 0.999 * radius, steps=25)
    best, strict = true_top1(model, x_adv, g)
    assert torch.equal(best, top1) and bool(strict.all()) and bool((margin < 0).all())


# -- near duplicates ----------------------------------------------------------------------------
@pytest.mark.parametrize("embedding,outside", [("append", 1.5), ("plain", 1.3), ("append-norm", None)])
def test_dedup_verdicts_hold_inside_their_radii_under_pgd(embedding, outside):
    """append-norm: the norm-aware radii of find_near_duplicates(embedding="append")."""
    norm_aware = embedding == "append-norm"
    embedding = "append" if norm_aware else embedding
    model = pixel_model(embedding)
    gallery, _ = pixel_gallery(seed=5)
    index = Index(model)
    index.add(gallery, [f"img{i}" for i in range(len(gallery))])
    emb, norms = np.asarray(index.embeddings), np.asarray(index.norms)
    e64 = emb.astype(np.float64)
    d_all = 1.0 - e64 @ e64.T
    iu = np.triu_indices(len(gallery), 1)
    threshold = float(np.median(d_all[iu]))
    eps = 0.05
    result = find_near_duplicates(
        emb,
        index.paths,
        threshold,
        eps=eps,
        norms=norms if embedding == "plain" else None,
        embedding="append" if norm_aware else None,
    )
    # listing completeness: every pair not listed is certified beyond eps
    listed = {(p.i, p.j) for p in result.pairs}
    all_radii = pair_threshold_radius(
        d_all[iu], threshold, None if embedding == "append" else (norms[iu[0]], norms[iu[1]])
    )
    if norm_aware:
        r = certify.append_norm_from_embedding(e64)
        aware = pair_threshold_radius(d_all[iu], threshold, (r[iu[0]], r[iu[1]]), "append")
        assert (aware >= all_radii).all() and (aware > all_radii).any()
        all_radii = aware
    for (i, j), r in zip(zip(*iu, strict=True), all_radii, strict=True):
        assert (i, j) in listed or r > eps
    pairs = [p for p in result.pairs if p.radius > 1e-4]
    assert any(p.below for p in pairs) and any(not p.below for p in pairs)
    # groups = connected components of the "below" pairs
    members = {p for g in result.groups for p in g}
    assert members == {q for p in result.pairs if p.below for q in (p.a, p.b)}
    # attack the first image of each pair (the radius is the min over which one is perturbed)
    x = gallery[[p.i for p in pairs]]
    partner = torch.from_numpy(emb[[p.j for p in pairs]])
    below = torch.tensor([p.below for p in pairs])
    radius = torch.tensor([p.radius for p in pairs], dtype=torch.float32)

    def verdicts(z):
        with torch.no_grad():
            d = 1.0 - (model.embed(z).double() * partner.double()).sum(dim=1)
        return d < threshold

    x_adv, _ = attack_threshold(
        model.embed, x, partner, threshold, below, 0.999 * radius, steps=100, restarts=2
    )
    assert torch.equal(verdicts(x_adv), below)
    if outside is None:
        return
    x_adv, _ = attack_threshold(model.embed, x, partner, threshold, below, outside * radius, steps=100)
    assert not torch.equal(verdicts(x_adv), below), "the attack should cross T just outside the radius"


def test_dedup_groups_are_connected_components():
    e = unit(np.array([[1.0, 0, 0], [1.0, 0.05, 0], [1.0, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]]))
    result = find_near_duplicates(e, list("abcde"), threshold=0.002, eps=0.05)
    # a~b and b~c are below T, a~c is not, yet a, b, c form one group
    d = {(p.a, p.b): p for p in result.pairs}
    assert d[("a", "b")].below and d[("b", "c")].below and not d[("a", "c")].below
    assert result.groups == [["a", "b", "c"]]
    assert result.certified_radius <= min(p.radius for p in result.pairs)


# -- the index ----------------------------------------------------------------------------------
def test_index_roundtrip_is_memory_mapped_and_refuses_another_model(tmp_path):
    model = lipsim.create_model("tiny-s2d", seed=0)
    gallery = smooth_images(5, 1)
    index = Index(model)
    index.add(gallery, [f"g{i}.png" for i in range(5)])
    before = index.search(gallery[:2], k=3)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx", model=model)
    assert isinstance(loaded.embeddings, np.memmap)
    after = loaded.search(gallery[:2], k=3)
    for r0, r1 in zip(before, after, strict=True):
        assert r0.paths == r1.paths and np.allclose(r0.distances, r1.distances)
        assert r0.certified_radius == pytest.approx(r1.certified_radius)
    assert after[0].paths[0] == "g0.png" and after[0].distances[0] < 1e-6
    with pytest.raises(ModelMismatchError):
        Index.load(tmp_path / "idx", model=lipsim.create_model("tiny-s2d", seed=1))
    with pytest.raises(ModelMismatchError):
        Index.load(tmp_path / "idx", model=lipsim.create_model("tiny-s2d", seed=0, embedding="plain"))
    with pytest.raises(IndexFormatError):
        Index.load(tmp_path / "nothing")


def test_incremental_add_after_reload_equals_one_bulk_add(tmp_path):
    rng = np.random.default_rng(1)
    emb = unit(rng.normal(size=(300, 24)))
    queries = unit(rng.normal(size=(5, 24)))
    bulk = Index(dim=24)
    bulk.add(emb)
    part = Index(dim=24)
    part.add(emb[:120])
    part.search(queries, k=3)  # builds FAISS, which must then follow the adds
    part.save(tmp_path / "p")
    part = Index.load(tmp_path / "p")
    part.add(emb[120:200], [f"item-{i}" for i in range(120, 200)])
    part.search(queries, k=3)
    part.add(emb[200:], [f"item-{i}" for i in range(200, 300)])
    for a, b in zip(
        bulk.search(queries, k=7, certify_k=20), part.search(queries, k=7, certify_k=20), strict=True
    ):
        assert a.paths == b.paths and np.array_equal(a.ids, b.ids)
        assert a.certified_radius == b.certified_radius
    part.save(tmp_path / "p")
    assert np.array_equal(np.asarray(Index.load(tmp_path / "p").embeddings), emb)


def test_approximate_index_is_not_certified_unless_reranked(tmp_path):
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 32))
    emb = unit(centres[rng.integers(0, 20, 600)] + 0.3 * rng.normal(size=(600, 32)))
    queries = unit(emb[:4] + 0.05 * rng.normal(size=(4, 32)))
    approx = Index(dim=32, approximate="hnsw")
    approx.add(emb)
    exact = Index(dim=32)
    exact.add(emb)
    for r in approx.search(queries, k=5):
        assert r.certified_radius is None and r.scope == "none" and "not certifiable" in r.note
    for r in approx.search(queries, k=5, rerank=50):
        assert r.scope == "candidates" and r.candidates == 50 and r.certified_radius is not None
    for r_a, r_e in zip(approx.search(queries, k=5, exact=True), exact.search(queries, k=5), strict=True):
        assert r_a.scope == r_e.scope == "gallery" and r_a.certified_radius == r_e.certified_radius
    approx.save(tmp_path / "h")
    assert len(list((tmp_path / "h").glob("hnsw-*.faiss"))) == 1
    again = Index.load(tmp_path / "h")
    assert again.approximate == "hnsw"
    assert [r.paths for r in again.search(queries, k=5)] == [r.paths for r in approx.search(queries, k=5)]
    grown = Index.load(tmp_path / "h")  # the stored graph, extended, saved and read back
    grown.add(unit(rng.normal(size=(300, 32))), [f"more-{i}" for i in range(300)])
    grown.save(tmp_path / "h")
    assert len(Index.load(tmp_path / "h").search(queries, k=5)[0].paths) == 5


def test_add_and_search_validate_their_inputs():
    index = Index(dim=4)
    with pytest.raises(ValueError, match="unit norm"):
        index.add(np.ones((2, 4)))
    with pytest.raises(ValueError, match="dimension"):
        index.add(unit(np.ones((2, 5))))
    with pytest.raises(ValueError, match="unique"):
        index.add(unit(np.eye(4)[:2]), ["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        index.search(unit(np.ones((1, 4))), k=1)
    with pytest.raises(ValueError, match="model"):
        index.add(torch.rand(1, 3, 224, 224))
    index.add(unit(np.eye(4)[:2]), ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        index.add(unit(np.eye(4)[2:3]), ["a"])
    (r,) = index.search(unit(np.array([[1.0, 0.2, 0, 0]])), k=1)
    assert r.paths == ["a"] and r.certified_radius > 0


# -- building from folders, and the command line ------------------------------------------------
def _write_folder(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    images = smooth_images(n, 7)
    names = []
    for i in range(n):
        name = f"img{i}.png" if i % 2 == 0 else f"sub/img{i}.png"
        lipsim.images.to_pil(images[i]).save(root / name)
        names.append(name)
    (root / "broken.jpg").write_bytes(b"not an image at all")
    (root / "notes.txt").write_text("ignored")
    return sorted(names)


def test_index_folder_resumes_after_an_interruption(tmp_path, monkeypatch):
    names = _write_folder(tmp_path / "photos")
    model = lipsim.create_model("tiny-s2d", seed=0)
    reference = index_folder(tmp_path / "photos", tmp_path / "ref", model, chunk_size=2, batch_size=2)
    calls = []
    real = build_mod.load_image

    def flaky(path, size=224):
        calls.append(str(path))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, size=size)

    monkeypatch.setattr(build_mod, "load_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        index_folder(tmp_path / "photos", tmp_path / "idx", model, chunk_size=2, batch_size=2)
    assert not Index.is_index(tmp_path / "idx")
    assert len(list((tmp_path / "idx" / "partial").glob("chunk-*.json"))) == 2
    calls.clear()
    monkeypatch.setattr(
        build_mod, "load_image", lambda p, size=224: (calls.append(str(p)), real(p, size=size))[1]
    )
    report = index_folder(tmp_path / "photos", tmp_path / "idx", model, chunk_size=2, batch_size=2)
    assert report.reused_chunks == 2 and len(calls) == 7 - 4  # 6 images + 1 broken file, 4 done
    assert not (tmp_path / "idx" / "partial").exists()
    done = Index.load(tmp_path / "idx", model=model)
    assert done.paths == reference.index.paths == names
    assert np.array_equal(np.asarray(done.embeddings), np.asarray(reference.index.embeddings))
    assert [p for p, _ in report.skipped] == ["broken.jpg"]
    # a later run adds only what is new
    lipsim.images.to_pil(smooth_images(1, 99)[0]).save(tmp_path / "photos" / "new.png")
    calls.clear()
    again = index_folder(tmp_path / "photos", tmp_path / "idx", model)
    assert again.added == 1 and again.previously_indexed == 6 and again.total == 7
    assert sorted(calls) == sorted(
        [str(tmp_path.resolve() / "photos" / "new.png"), str(tmp_path.resolve() / "photos" / "broken.jpg")]
    )


def test_cli_index_search_dedup(tmp_path, capsys, monkeypatch):
    # only this module's commands: other command modules are developed separately
    monkeypatch.setattr(lipsim.cli, "COMMAND_MODULES", ("core", "retrieval"))
    names = _write_folder(tmp_path / "photos")
    (tmp_path / "photos" / "copy_of_img0.png").write_bytes((tmp_path / "photos" / "img0.png").read_bytes())
    model_file = tmp_path / "model.safetensors"
    lipsim.create_model("tiny-s2d", seed=0).save(model_file)
    idx = tmp_path / "idx"
    common = ["--no-progress", "--workers", "0", "--batch-size", "3"]
    assert (
        main(
            [
                "index",
                str(tmp_path / "photos"),
                "--out",
                str(idx),
                "--model",
                str(model_file),
                "--json",
                *common,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["total"] == len(names) + 1 and report["model"]["arch"] == "tiny-s2d"
    assert [s["path"] for s in report["skipped"]] == ["broken.jpg"] and "broken.jpg" in err

    query = str(tmp_path / "photos" / "sub" / "img1.png")
    assert main(["search", str(idx), query, "-k", "3", "--json"]) == 0  # model found from the index
    res = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in res["results"]][0] == "sub/img1.png" and len(res["results"]) == 3
    assert res["results"][0]["distance"] < 1e-6 and res["certified_radius"] > 0
    assert res["certified_scope"] == "gallery"

    assert main(["search", str(idx), query, "--model", "arch:tiny", "--json"]) == 1
    err = capsys.readouterr().err
    assert "different model" in err and err.count("\n") == 1

    assert (
        main(
            [
                "dedup",
                str(tmp_path / "photos"),
                "--threshold",
                "0.001",
                "--model",
                str(model_file),
                "--json",
                *common,
            ]
        )
        == 0
    )
    dup = json.loads(capsys.readouterr().out)
    assert dup["groups"][0]["paths"] == ["copy_of_img0.png", "img0.png"]
    pair = next(p for p in dup["pairs"] if p["verdict"] == "below")
    assert pair["distance"] < 1e-6 and pair["radius"] > 0
    assert main(["dedup", str(idx), "--threshold", "0.001", "--json"]) == 0  # straight from the index
    assert json.loads(capsys.readouterr().out)["groups"][0]["paths"] == ["copy_of_img0.png", "img0.png"]


def test_radius_threshold_plain_mode_is_sound_for_the_movement_bound():
    d = np.array([0.01, 0.03, 0.2, 0.5])
    norms = (np.array([0.3, 2.0, 0.8, 5.0]), np.array([1.5, 0.4, 3.0, 5.0]))
    radii = pair_threshold_radius(d, 0.1, norms)
    margins = certify.radius_threshold(torch.tensor(d), 0.1).double().numpy()
    for r, m, n0, n1 in zip(radii, margins, *norms, strict=True):
        for norm in (n0, n1):
            rho = float(certify.movement_bound(r * 0.999, torch.tensor([norm], dtype=torch.float64)))
            assert rho < m  # the embedding cannot move far enough to cross T
    assert np.all(radii <= margins + 1e-12)


# -- damaged, tampered and half-written indexes -------------------------------------------------
def _saved_index(tmp_path, n=4, dim=8, **kwargs):
    identity = ModelIdentity(arch="tiny", embedding="append", weights_sha256="0" * 64, dim=dim)
    index = Index(dim=dim, identity=identity, **kwargs)
    index.add(
        unit(np.random.default_rng(0).normal(size=(n, dim))), [f"i{k}" for k in range(n)], norms=np.ones(n)
    )
    index.info.update(root="/r", skipped=[["bad.png", "unreadable"]], model_source="arch:tiny")
    return index.save(tmp_path / "idx")


def _data(idx, name):
    """The data file ``name`` of the index's current generation."""
    meta = json.loads((idx / "meta.json").read_text())
    suffix = {"embeddings": ".npy", "norms": ".npy", "paths": ".json", "hnsw": ".faiss"}[name]
    return idx / (f"{name}-{meta['generation']}{suffix}" if "generation" in meta else f"{name}{suffix}")


def _edit_meta(idx, change):
    meta = json.loads((idx / "meta.json").read_text())
    change(meta)
    (idx / "meta.json").write_text(json.dumps(meta))


def _refused(idx, search=False):
    with pytest.raises(IndexFormatError) as exc:
        index = Index.load(idx)
        if search:
            index.search(unit(np.ones((1, index.dim))), k=1)
    assert str(idx) in str(exc.value) and "\n" not in str(exc.value)
    return str(exc.value)


def _set_rows(rows, values=None, scale=1.0):
    def change(idx):
        emb = np.load(_data(idx, "embeddings")) * np.float32(scale)
        if values is not None:
            emb[rows] = values
        np.save(_data(idx, "embeddings"), emb)

    return change


@pytest.mark.parametrize(
    "tamper",
    [
        _set_rows(slice(None), scale=10.0),
        _set_rows(1, np.inf),
        _set_rows(2, np.nan),
        _set_rows(0, 0.0),
        lambda idx: np.save(_data(idx, "norms"), -np.ones(4, np.float32)),
        lambda idx: np.save(_data(idx, "norms"), np.array([1, np.inf, 1, 1], np.float32)),
    ],
    ids=["x10", "inf-row", "nan-row", "zero-row", "negative-norms", "inf-norm"],
)
def test_load_refuses_embeddings_that_are_not_finite_unit_rows(tmp_path, tamper):
    idx = _saved_index(tmp_path)
    tamper(idx)
    assert "finite" in _refused(idx)


def test_unknown_norms_still_load_and_dedup_checks_its_input(tmp_path):
    index = Index(dim=8)  # no norms given: stored as NaN (unknown), which is not damage
    index.add(unit(np.eye(8)[:3] + 0.1))
    assert np.isnan(Index.load(index.save(tmp_path / "idx")).norms).all()
    with pytest.raises(ValueError, match="unit norm"):
        find_near_duplicates(np.eye(3) * 2, ["a", "b", "c"], threshold=0.1)
    with pytest.raises(ValueError, match="unit norm"):
        find_near_duplicates(np.full((2, 3), np.nan), ["a", "b"], threshold=0.1)


def test_hnsw_settings_are_validated(tmp_path):
    for bad in (dict(hnsw_m=0), dict(hnsw_m=1), dict(hnsw_m=-5), dict(hnsw_m=2.5), dict(hnsw_m=True)):
        with pytest.raises(ValueError, match="HNSW M"):
            Index(dim=4, approximate="hnsw", **bad)
    for bad in (dict(ef_search=0), dict(ef_construction=-1), dict(ef_search=1 << 40), dict(ef_search="8")):
        with pytest.raises(ValueError, match="HNSW ef_"):
            Index(dim=4, approximate="hnsw", **bad)
    idx = _saved_index(tmp_path, approximate="hnsw", hnsw_m=4)
    for approx in ({"kind": "hnsw", "M": 0}, {"kind": "hnsw", "M": -5}, {"kind": "hnsw", "ef_search": -1}):
        _edit_meta(idx, lambda m, a=approx: m.update(approximate=a))
        assert "HNSW" in _refused(idx)  # never reaches FAISS, which aborts on M = 0


def _replace_header(idx):
    file = _data(idx, "embeddings")
    file.write_bytes(file.read_bytes().replace(b"(4, 8)", b"(99999", 1))


def _deep(idx):
    (idx / "meta.json").write_text('{"format": "lipsim-index", "x": ' + "[" * 100000 + "]" * 100000 + "}")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.update(approximate="hnsw"),
        lambda m: m.update(approximate={}),
        lambda m: m.update(approximate={"kind": "ivf"}),
        lambda m: m.update(dim=None),
        lambda m: m.update(count="x"),
        lambda m: m.update(count=4.0),
        lambda m: m.update(format_version=[1]),
        lambda m: m.pop("format_version"),
        lambda m: m.update(generation="../../etc/x"),
        lambda m: m.update(info=5),
        lambda m: m.update(info="abc"),
        lambda m: m.update(model=[1]),
        lambda m: m.update(model={"arch": "tiny"}),
        lambda m: m["model"].update(embedding="Plain"),  # would pick the append-mode certificate
        lambda m: m["model"].update(dim=9),
        lambda m: m["info"].update(model_source=5),
        lambda m: m["info"].update(root=["x"]),
        lambda m: m["info"].update(skipped=5),
        lambda m: m["info"].update(skipped=[["a", "b", "c"]]),
        _deep,
        _replace_header,
        lambda idx: _data(idx, "paths").write_text(json.dumps([[k] for k in range(4)])),
        lambda idx: _data(idx, "paths").write_text("[" * 100000 + "]" * 100000),
        lambda idx: np.save(_data(idx, "norms"), np.array(["a"] * 4)),
    ],
    ids=(
        "approx-str approx-empty approx-ivf dim-null count-str count-float version-list version-missing "
        "generation-escape info-int info-str model-list model-keys model-embedding model-dim "
        "model-source-int root-list skipped-int skipped-triple deep-json npy-header paths-nested "
        "paths-deep norms-str"
    ).split(),
)
def test_load_validates_every_field_and_file(tmp_path, tamper):
    idx = _saved_index(tmp_path)
    if tamper.__code__.co_varnames[:1] == ("m",):
        _edit_meta(idx, tamper)
    else:
        tamper(idx)
    _refused(idx)


@pytest.mark.parametrize("graph", ["garbage", "empty", "directory", "flat", "links"])
def test_a_damaged_hnsw_graph_is_an_index_format_error(tmp_path, graph):
    import faiss

    idx = _saved_index(tmp_path, approximate="hnsw", hnsw_m=4)
    file = _data(idx, "hnsw")
    stored = faiss.read_index(str(file))
    file.unlink()
    if graph == "links":  # a readable graph whose neighbour ids point outside the index
        links = faiss.vector_to_array(stored.hnsw.neighbors)
        links[0] = 10**6
        faiss.copy_array_to_vector(links, stored.hnsw.neighbors)
        faiss.write_index(stored, str(file))
    elif graph == "garbage":
        file.write_bytes(b"IHNf" + bytes(range(256)) * 8)
    elif graph == "empty":
        file.write_bytes(b"")
    elif graph == "directory":
        file.mkdir()
    else:  # a readable FAISS file, but not this index's graph
        faiss.write_index(faiss.IndexFlatIP(8), str(file))
    _refused(idx, search=True)


def test_cli_reports_a_damaged_index_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lipsim.cli, "COMMAND_MODULES", ("core", "retrieval"))
    idx = _saved_index(tmp_path)
    _edit_meta(idx, lambda m: m["info"].update(skipped=5))
    for argv in (["dedup", str(idx), "--threshold", "0.1"], ["search", str(idx), "q.png"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(idx) in err and "skipped" in err


def test_an_interrupted_save_leaves_the_previous_index(tmp_path, monkeypatch):
    idx = _saved_index(tmp_path, n=3)
    index = Index.load(idx)
    index.add(unit(np.random.default_rng(1).normal(size=(2, 8))), ["n0", "n1"], norms=np.ones(2))
    real, calls = index_mod.atomic_write, []

    def interrupted(path, write):
        calls.append(path)
        if len(calls) == 2:  # embeddings written, norms not
            raise KeyboardInterrupt
        real(path, write)

    for module in (index_mod, fileio):  # the index writes through both
        monkeypatch.setattr(module, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        index.save(idx)
    for module in (index_mod, fileio):
        monkeypatch.setattr(module, "atomic_write", real)
    before = Index.load(idx)
    assert len(before) == 3 and before.search(np.asarray(before.embeddings[:1]), k=1)[0].paths == ["i0"]
    index.save(idx)
    after = Index.load(idx)
    assert after.paths == ["i0", "i1", "i2", "n0", "n1"]
    assert sorted(f.name.split("-")[0] for f in idx.iterdir()) == [
        "embeddings",
        "meta.json",
        "norms",
        "paths",
    ]


def _as_version1(idx):
    """Rewrites a saved index in the format-1 layout (fixed file names, no generation)."""
    for name in ("embeddings", "norms", "paths", "hnsw"):
        file = _data(idx, name)
        if file.exists():
            file.rename(idx / (name + file.suffix))
    _edit_meta(idx, lambda m: (m.pop("generation"), m.update(format_version=1)))


def test_version1_indexes_load_and_are_upgraded_by_the_next_save(tmp_path):
    idx = _saved_index(tmp_path, approximate="hnsw", hnsw_m=4)
    _as_version1(idx)
    index = Index.load(idx)
    assert (
        index.paths == ["i0", "i1", "i2", "i3"]
        and index.search(np.asarray(index.embeddings[:1]))[0].ids[0] == 0
    )
    index.save(idx)
    assert not (idx / "embeddings.npy").exists() and not (idx / "hnsw.faiss").exists()
    assert json.loads((idx / "meta.json").read_text())["format_version"] == index_mod.FORMAT_VERSION
    assert Index.load(idx).paths == index.paths


def test_interrupted_extension_resumes_and_restart_recovers_a_broken_index(tmp_path, monkeypatch):
    _write_folder(tmp_path / "photos")
    model = lipsim.create_model("tiny-s2d", seed=0)
    first = index_folder(tmp_path / "photos", tmp_path / "idx", model)
    lipsim.images.to_pil(smooth_images(1, 99)[0]).save(tmp_path / "photos" / "new.png")
    real, calls = index_mod.atomic_write, []

    def interrupted(path, write):
        if "partial" not in Path(path).parts:  # the chunks are written; the index's save is cut
            calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, write)

    for module in (index_mod, fileio):  # the index writes through both
        monkeypatch.setattr(module, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        index_folder(tmp_path / "photos", tmp_path / "idx", model)
    for module in (index_mod, fileio):
        monkeypatch.setattr(module, "atomic_write", real)
    assert Index.load(tmp_path / "idx").paths == first.index.paths  # the previous index, intact
    again = index_folder(tmp_path / "photos", tmp_path / "idx", model)
    assert again.total == first.total + 1 and "new.png" in Index.load(tmp_path / "idx").paths
    lipsim.images.to_pil(smooth_images(1, 98)[0]).save(tmp_path / "photos" / "new2.png")
    with monkeypatch.context() as patch:  # saved, but interrupted before partial/ is removed
        patch.setattr(build_mod.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            index_folder(tmp_path / "photos", tmp_path / "idx", model)
    again = index_folder(tmp_path / "photos", tmp_path / "idx", model)
    assert again.total == first.total + 2 and again.added == 0
    # an index broken by an older lipsim (format 1, files from two saves): refused, --restart rebuilds
    _as_version1(tmp_path / "idx")
    emb = np.load(tmp_path / "idx" / "embeddings.npy")
    np.save(tmp_path / "idx" / "embeddings.npy", emb[:-1])
    with pytest.raises(IndexFormatError, match="--restart"):
        index_folder(tmp_path / "photos", tmp_path / "idx", model)
    assert index_folder(tmp_path / "photos", tmp_path / "idx", model, restart=True).added == again.total
    assert sorted(Index.load(tmp_path / "idx").paths) == sorted(again.index.paths)
    assert not (tmp_path / "idx" / "embeddings.npy").exists()


def test_resumed_chunks_with_non_finite_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unit norm"):
        Index(dim=4)._append(np.array([[np.nan, 0, 0, 1]], np.float32), None, None)
    (tmp_path / "photos").mkdir()
    model = lipsim.create_model("tiny-s2d", seed=0)
    identity = ModelIdentity.of(model)
    partial = tmp_path / "idx" / "partial"
    partial.mkdir(parents=True)
    manifest = {"model": identity.as_dict(), "root": str((tmp_path / "photos").resolve())}
    (partial / "manifest.json").write_text(json.dumps(manifest))
    emb = unit(np.random.default_rng(0).normal(size=(2, identity.dim)))
    emb[1] = np.nan
    np.save(partial / "chunk-000000.emb.npy", emb)
    np.save(partial / "chunk-000000.norms.npy", np.ones(2, np.float32))
    (partial / "chunk-000000.json").write_text(json.dumps({"paths": ["a.png", "b.png"], "skipped": []}))
    with pytest.raises(IndexFormatError, match="--restart"):
        index_folder(tmp_path / "photos", tmp_path / "idx", model)
    assert index_folder(tmp_path / "photos", tmp_path / "idx", model, restart=True).total == 0
