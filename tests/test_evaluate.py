"""Evaluation: 2AFC scoring, eval/attack/attack-distance commands, metrics, torchattacks batching."""

from __future__ import annotations

import csv
import importlib.machinery
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
import torchattacks
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import lipsim
from lipsim.cli import main
from lipsim.evaluate import scoring
from lipsim.evaluate.attacks import (
    APGDFullBatch,
    AttackSettings,
    SubsetCallError,
    TwoAFCLogits,
    linf_to_l2,
    perturb_references,
    project_to_ball,
)
from lipsim.evaluate.metrics import LipSimMetric, MetricUnavailable, get_metric, ssim

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NIGHT_HEADER = "id,left_vote,right_vote,votes,ref_path,left_path,right_path,family,split,is_imagenet".split(
    ","
)


# -- fixtures ---------------------------------------------------------------------------------------
def _png(path, rng, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def night_dir(tmp_path_factory):
    """NIGHT layout: 9 kept test rows (4 imagenet, 5 not), one dropped (votes 4), two val rows."""
    root = tmp_path_factory.mktemp("night")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        ref, left, right = f"ref/000/{i:03d}.png", f"distort/000/{i:03d}_0.png", f"distort/000/{i:03d}_1.png"
        for p in (ref, left, right):
            _png(root / p, rng)
        right_vote = (i * 7 % 3) % 2
        votes = 4 if i == 5 else 6
        split = "test" if i < 10 else "val"
        family = "blur" if i % 3 else "jpeg"
        rows.append([i, 1 - right_vote, right_vote, votes, ref, left, right, family, split, i < 4])
    with open(root / "data.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(NIGHT_HEADER)
        writer.writerows(rows)
    return root


BAPPS_JUDGE = {"traditional": [0.2, 0.6, 1.0], "cnn": [0.4, 0.8]}


@pytest.fixture(scope="module")
def bapps_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bapps")
    rng = np.random.default_rng(1)
    for category, judgements in BAPPS_JUDGE.items():
        for i, y in enumerate(judgements):
            for sub in ("ref", "p0", "p1"):
                _png(root / "2afc" / "val" / category / sub / f"{i:06d}.png", rng)
            (root / "2afc" / "val" / category / "judge").mkdir(parents=True, exist_ok=True)
            np.save(root / "2afc" / "val" / category / "judge" / f"{i:06d}.npy", np.array([y]))
    return root


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    lipsim.create_model("tiny-s2d", seed=3).save(path)
    return path


@pytest.fixture(scope="module")
def model(model_path):
    return lipsim.load(model_path)


def _run_json(capsys, argv) -> tuple[int, dict]:
    code = main([*argv, "--json", "--no-progress"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def _hand_score(d0: float, d1: float, y: float) -> float:
    if d0 < d1:
        return 1 - y
    if d1 < d0:
        return y
    return 0.5


# -- scoring ----------------------------------------------------------------------------------------
def test_score_2afc_hand_computed():
    d0 = [0.1, 0.1, 0.3, 0.3, 0.2, 0.2, 0.5]
    d1 = [0.2, 0.2, 0.1, 0.1, 0.2, 0.2, 0.4]
    y = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.6]
    # x0 closer & y=0 -> 1; x0 closer & y=1 -> 0; x1 closer & y=0 -> 0; x1 closer & y=1 -> 1;
    # ties -> 0.5 whatever y; x1 closer & y=0.6 -> 0.6
    expected = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.6]
    assert scoring.score_2afc(d0, d1, y).tolist() == pytest.approx(expected, abs=1e-15)
    assert scoring.natural_score(expected) == pytest.approx(3.6 / 7)
    # fractional BAPPS labels: 5 judges, 3 prefer x1
    assert float(scoring.score_2afc([0.4], [0.3], [0.6])[0]) == pytest.approx(0.6)
    assert float(scoring.score_2afc([0.3], [0.4], [0.6])[0]) == pytest.approx(0.4)
    assert scoring.decision(d0, d1).tolist() == [0, 0, 1, 1, -1, -1, 1]


def test_certified_score_is_strict_and_ties_never_count():
    scores = [1.0, 0.6, 0.5, 1.0]
    radius = [0.2, 0.1, 0.0, 0.05]  # the third triplet is a tie: radius 0
    assert scoring.certified_score(scores, radius, 0.0) == pytest.approx((1.0 + 0.6 + 1.0) / 4)
    assert scoring.certified_score(scores, radius, 0.1) == pytest.approx(1.0 / 4)  # 0.1 is not > 0.1
    assert scoring.certified_score(scores, radius, 0.2) == 0.0
    out = scoring.certified_scores(scores, radius, [0.05, 0.15])
    assert out == [
        {"eps": 0.05, "score": pytest.approx(1.6 / 4)},
        {"eps": 0.15, "score": pytest.approx(0.25)},
    ]
    curve = scoring.certified_curve(scores, radius, [0.0, 0.1, 0.2])
    assert curve.tolist() == pytest.approx([2.6 / 4, 0.25, 0.0])


def test_group_scores_and_night_weighting():
    scores = [1, 0, 1, 1, 0]
    groups = ["test_imagenet", "test_imagenet", "test_no_imagenet", "test_no_imagenet", "test_no_imagenet"]
    g = scoring.group_scores(scores, groups, radius=[1, 1, 0, 1, 1], eps_list=[0.5])
    assert g["test_imagenet"] == {"n": 2, "natural_2afc": 0.5, "certified": [{"eps": 0.5, "score": 0.5}]}
    assert g["test_no_imagenet"]["n"] == 3
    assert g["test_no_imagenet"]["natural_2afc"] == pytest.approx(2 / 3)
    assert g["test_no_imagenet"]["certified"][0]["score"] == pytest.approx(1 / 3)
    overall = scoring.weighted_mean([0.5, 2 / 3], [2, 3])
    assert overall == pytest.approx(scoring.natural_score(scores)) == pytest.approx(0.6)
    assert scoring.weighted_mean([0.6, 0.7, 0.3], [3, 2, 2]) == pytest.approx(
        (1.8 + 1.4 + 0.6) / 7, abs=1e-15
    )


def test_scoring_rejects_bad_input():
    with pytest.raises(ValueError, match="fractions"):
        scoring.score_2afc([0.1], [0.2], [1.5])
    with pytest.raises(ValueError, match="length mismatch"):
        scoring.score_2afc([0.1, 0.2], [0.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        scoring.score_2afc([math.nan], [0.2], [1])
    assert scoring.worse_of([1.0, 0.0, 0.6], [0.0, 1.0, 0.4]).tolist() == [0.0, 0.0, 0.4]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 2, allow_nan=False),
            st.floats(0, 2, allow_nan=False),
            st.sampled_from([0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]),
            st.floats(0, 1, allow_nan=False),
        ),
        min_size=1,
        max_size=30,
    ),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_scoring_properties(rows, eps_a, eps_b):
    d0, d1, y, radius = (list(c) for c in zip(*rows, strict=True))
    s = scoring.score_2afc(d0, d1, y)
    assert s.tolist() == pytest.approx([_hand_score(a, b, c) for a, b, c in zip(d0, d1, y, strict=True)])
    # swapping the candidates and the preference changes nothing
    assert scoring.score_2afc(d1, d0, [1 - v for v in y]).tolist() == pytest.approx(s.tolist())
    lo, hi = sorted((eps_a, eps_b))
    natural = scoring.natural_score(s)
    assert (
        0 <= scoring.certified_score(s, radius, hi) <= scoring.certified_score(s, radius, lo) <= natural <= 1
    )


# -- eval -------------------------------------------------------------------------------------------
def _night_rows(root):
    with open(root / "data.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r for r in rows if r["split"] == "test" and float(r["votes"]) >= 6]


def test_eval_night_json_matches_direct_recomputation(night_dir, model_path, model, tmp_path, capsys):
    rows = _night_rows(night_dir)
    direct = []  # one triplet at a time, straight from the files: (row, d0, d1, radius)
    for r in rows:
        ref, x0, x1 = (lipsim.load_image(night_dir / r[k]) for k in ("ref_path", "left_path", "right_path"))
        c = model.certify_2afc(ref, x0, x1)
        direct.append((r, float(c.d0[0]), float(c.d1[0]), float(c.radius[0])))
    # a radius between two certified ones, so that some correct answers are certified and some not
    radii = sorted(rad for r, d0, d1, rad in direct if _hand_score(d0, d1, float(r["right_vote"])) > 0)
    assert len(radii) >= 2 and radii[0] < radii[-1]
    eps = (radii[0] + radii[-1]) / 2
    out_dir = tmp_path / "report"
    code, out = _run_json(
        capsys,
        [
            "eval",
            "night",
            "--data-dir",
            str(night_dir),
            "--model",
            str(model_path),
            "--eps",
            f"{eps!r},36/255",
            "--batch-size",
            "4",
            "--out",
            str(out_dir),
        ],
    )
    assert code == 0
    assert out["dataset"] == "night" and out["split"] == "test" and out["n"] == len(rows) == 9
    by_group: dict[str, list[float]] = {}
    cert_by_group: dict[str, list[float]] = {}
    by_family: dict[str, list[float]] = {}
    natural, cert = [], []
    for r, d0, d1, radius in direct:
        s = _hand_score(d0, d1, float(r["right_vote"]))
        certified = s if radius > eps else 0.0
        natural.append(s)
        cert.append(certified)
        group = "test_imagenet" if r["is_imagenet"] == "True" else "test_no_imagenet"
        by_group.setdefault(group, []).append(s)
        cert_by_group.setdefault(group, []).append(certified)
        by_family.setdefault(r["family"], []).append(s)
    assert out["natural_2afc"] == pytest.approx(sum(natural) / len(natural), abs=1e-9)
    assert [c["eps"] for c in out["certified"]] == pytest.approx([eps, 36 / 255])
    assert out["certified"][0]["score"] == pytest.approx(sum(cert) / len(cert), abs=1e-9)
    assert 0 < sum(cert) < sum(natural)
    assert set(out["groups"]) == {"test_imagenet", "test_no_imagenet"}
    for group, values in by_group.items():
        entry = out["groups"][group]
        assert entry["n"] == len(values)
        assert entry["natural_2afc"] == pytest.approx(sum(values) / len(values), abs=1e-9)
        assert entry["certified"][0]["score"] == pytest.approx(
            sum(cert_by_group[group]) / len(values), abs=1e-9
        )
    # NIGHT test = size-weighted mean of its two groups
    weighted = sum(e["n"] * e["natural_2afc"] for e in out["groups"].values()) / out["n"]
    assert out["natural_2afc"] == pytest.approx(weighted, abs=1e-12)
    assert {k: v["n"] for k, v in out["families"].items()} == {k: len(v) for k, v in by_family.items()}
    assert any("synthetic" in c for c in out["caveats"]) and any("n = 9" in c for c in out["caveats"])
    # files
    assert json.loads((out_dir / "results.json").read_text())["natural_2afc"] == out["natural_2afc"]
    png = (out_dir / "certified.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    summary = (out_dir / "summary.md").read_text()
    assert "Not the published setting" in summary and "family" in summary and "86.55" in summary
    with open(out_dir / "per_triplet.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 9


def test_eval_bapps_json_matches_direct_recomputation(bapps_dir, model_path, model, tmp_path, capsys):
    code, out = _run_json(
        capsys,
        [
            "eval",
            "bapps",
            "--data-dir",
            str(bapps_dir),
            "--model",
            str(model_path),
            "--eps",
            "0.002",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert code == 0
    assert out["n"] == 5 and out["split"] == "val" and out["families"] == {}
    all_scores, all_cert = [], []
    for category, judgements in BAPPS_JUDGE.items():
        folder = bapps_dir / "2afc" / "val" / category
        scores, cert = [], []
        for i, y in enumerate(judgements):
            ref, x0, x1 = (lipsim.load_image(folder / sub / f"{i:06d}.png") for sub in ("ref", "p0", "p1"))
            c = model.certify_2afc(ref, x0, x1)
            s = _hand_score(float(c.d0[0]), float(c.d1[0]), y)
            scores.append(s)
            cert.append(s if float(c.radius[0]) > 0.002 else 0.0)
        assert out["groups"][category]["natural_2afc"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
        assert out["groups"][category]["certified"][0]["score"] == pytest.approx(
            sum(cert) / len(cert), abs=1e-6
        )
        all_scores += scores
        all_cert += cert
    assert out["natural_2afc"] == pytest.approx(sum(all_scores) / 5, abs=1e-6)
    assert out["certified"][0]["score"] == pytest.approx(sum(all_cert) / 5, abs=1e-6)
    published = out["bapps_published_units"]
    assert published["categories"] == ["traditional", "cnn"]
    assert [c["eps"] for c in published["certified"]] == pytest.approx([18 / 255, 36 / 255, 54 / 255])
    summary = (tmp_path / "b" / "summary.md").read_text()
    assert "[−1, 1]" in summary and "73.47" in summary and "≈4,700" in summary


def _results(y, closer, radius, d0=None, d1=None, groups=None):
    from lipsim.evaluate.twoafc import TripletResults

    n = len(y)
    d0 = torch.zeros(n, dtype=torch.float64) if d0 is None else torch.tensor(d0, dtype=torch.float64)
    d1 = torch.ones(n, dtype=torch.float64) if d1 is None else torch.tensor(d1, dtype=torch.float64)
    return TripletResults(
        ids=[str(i) for i in range(n)],
        groups=groups or ["cnn"] * n,
        families=[""] * n,
        y=torch.tensor(y, dtype=torch.float64),
        d0=d0,
        d1=d1,
        closer=torch.tensor(closer),
        radius=torch.tensor(radius, dtype=torch.float64),
    )


def test_bapps_published_units_use_the_reference_evaluators_score():
    """The reference counts a certified triplet 1 when the metric agrees with the judges'
    majority; the fractional score (0.7 here) was shown beside its numbers instead."""
    from lipsim.evaluate.twoafc import _bapps_published_units

    res = _results([0.6, 0.8, 0.6, 0.8, 0.2], closer=[1, 1, 1, 1, 1], radius=[0.6, 0.6, 0.6, 0.6, 0.6])
    out = _bapps_published_units(res, [36 / 255])["certified"][0]
    assert out["score"] == pytest.approx(4 / 5)  # the minority answer (y = 0.2) counts 0
    assert out["score_fractional"] == pytest.approx((0.6 + 0.8 + 0.6 + 0.8 + 0.2) / 5)
    uncertified = _results([0.8], closer=[1], radius=[0.05])  # 0.05 < (36/255)/2
    assert _bapps_published_units(uncertified, [36 / 255])["certified"][0]["score"] == 0.0


def test_scores_take_ties_from_the_answers_not_from_float_noise():
    """x0 = x1 = ref: the certificate calls it a tie (TIE_TOL), whatever the batch's rounding
    left in d0 and d1; the score used to follow d0 < d1 (0.0 in a batch of 3, 0.5 alone)."""
    res = _results([1.0], closer=[-1], radius=[0.0], d0=[1.1e-16], d1=[2.7e-13])
    assert float(res.scores[0]) == 0.5
    assert res.rows()[0]["score"] == 0.5


def test_eval_text_limit_and_errors(night_dir, model_path, capsys):
    argv = ["eval", "night", "--data-dir", str(night_dir), "--model", str(model_path), "--limit", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "batch" in captured.err  # the tqdm bar goes to stderr, never into the table
    assert "NIGHT test" in text and "cert@36/255" in text and "--limit 3" in text and "synthetic" in text
    assert main(["eval", "night", "--data-dir", str(night_dir / "nope"), "--model", str(model_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.csv" in err


# -- attacks ----------------------------------------------------------------------------------------
def _triplets(night_dir, n=5):
    rows = _night_rows(night_dir)[:n]
    ref, x0, x1 = (
        torch.cat([lipsim.load_image(night_dir / r[k]) for r in rows])
        for k in ("ref_path", "left_path", "right_path")
    )
    return ref, x0, x1, torch.tensor([float(r["right_vote"]) for r in rows])


def test_stock_apgd_subset_calls_are_caught_and_full_batch_apgd_aligns(night_dir, model):
    metric = LipSimMetric(model)
    ref, x0, x1, y = _triplets(night_dir)
    labels = torch.round(y).long()
    logits = TwoAFCLogits(metric, x0, x1)
    with torch.no_grad():
        correct = logits(ref).argmax(1) == labels
    assert 0 < int(correct.sum()) < len(y), "fixture needs right and wrong answers"
    # torchattacks' own APGD attacks only the initially-correct subset: our module refuses it
    with pytest.raises(SubsetCallError):
        torchattacks.APGD(logits, norm="L2", eps=0.5, steps=2)(ref, labels)
    adv = APGDFullBatch(logits, norm="L2", eps=2.0, steps=5, seed=0)(ref, labels)
    assert torch.equal(adv[~correct], ref[~correct])  # wrong answers are not attacked
    with torch.no_grad():
        recomputed = torch.stack([model(adv, x1), model(adv, x0)], dim=1)
        assert torch.allclose(logits(adv), recomputed, atol=1e-6)


@pytest.mark.parametrize(
    "attack,norm,eps,steps",
    [
        ("apgd-ce", "l2", 2.0, 5),
        ("square", "l2", 2.0, 20),
        ("pgd", "linf", 0.02, 3),
        ("mifgsm", "l2", 2.0, 3),
    ],
)
def test_perturb_references_stay_aligned_and_in_budget(night_dir, model, attack, norm, eps, steps):
    metric = LipSimMetric(model)
    ref, x0, x1, y = _triplets(night_dir)
    s = AttackSettings(attack, norm, eps, steps=steps, step_size=0.5 if norm == "l2" else 0.01)
    out = perturb_references(metric, ref, x0, x1, y, s)
    delta = (out.adv - ref).double().flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps).all()) and float(out.adv.min()) >= 0 and float(out.adv.max()) <= 1
    with torch.no_grad():  # the logits reported for row i are those of triplet i, recomputed alone
        for i in range(len(y)):
            d1 = float(model(out.adv[i : i + 1], x1[i : i + 1]))
            d0 = float(model(out.adv[i : i + 1], x0[i : i + 1]))
            assert out.logits[i].tolist() == pytest.approx([d1, d0], abs=1e-6)


def test_attack_command_consistency(night_dir, model_path, capsys):
    base = ["attack", "night", "--data-dir", str(night_dir), "--model", str(model_path), "--batch-size", "5"]
    # a small budget: some triplets are certified beyond it
    code, small = _run_json(
        capsys, [*base, "--attack", "apgd-ce", "--norm", "l2", "--eps", "0.002", "--steps", "5"]
    )
    # a large one: the attack changes answers
    code2, large = _run_json(
        capsys,
        [*base, "--attack", "pgd", "--norm", "l2", "--eps", "2.0", "--steps", "5", "--step-size", "0.5"],
    )
    assert code == code2 == 0
    for r in (small, large):
        keys = {
            "dataset",
            "split",
            "n",
            "metric",
            "attack",
            "norm",
            "eps",
            "natural_2afc",
            "attacked_2afc",
            "certified_2afc",
            "violations",
        }
        assert keys <= set(r) and r["n"] == 9 and r["metric"] == "lipsim"
        assert r["violations"] == 0 and r["violations_measured_norm"] == 0
        assert r["certified_2afc"] <= r["attacked_2afc"] + 1e-12 <= r["natural_2afc"] + 2e-12
        assert r["max_delta_l2"] <= r["eps"] and r["logits_recompute_max_abs_diff"] < 1e-5
    assert small["certified_2afc"] > 0
    assert large["n_flipped"] > 0 and large["attacked_2afc"] < large["natural_2afc"]
    assert large["certified_2afc"] == 0


def test_linf_budget_is_converted_to_l2(night_dir, model_path, capsys):
    assert linf_to_l2(4 / 255) == pytest.approx(math.sqrt(3 * 224 * 224) * 4 / 255)
    assert linf_to_l2(1.0, (3, 2, 2)) == pytest.approx(math.sqrt(12))
    argv = [
        "attack",
        "night",
        "--data-dir",
        str(night_dir),
        "--model",
        str(model_path),
        "--attack",
        "mifgsm",
        "--norm",
        "linf",
        "--eps",
        "1/255",
        "--steps",
        "2",
        "--limit",
        "4",
    ]
    code, r = _run_json(capsys, argv)
    assert code == 0 and r["n"] == 4
    assert r["l2_budget"] == pytest.approx(math.sqrt(3 * 224 * 224) / 255)
    assert r["max_delta_linf"] <= 1 / 255 and r["max_delta_l2"] <= r["l2_budget"]
    assert main([*argv, "--no-progress"]) == 0
    assert "√(3·224·224)·ε" in capsys.readouterr().out


class _InflatedCertificates(LipSimMetric):
    """A deliberately wrong certificate (radius ×1000), to show that violations are detected."""

    def __init__(self, model):
        super().__init__(model)

        def certify(ref, x0, x1):
            c = model.certify_2afc(ref, x0, x1)
            c.radius = c.radius * 1000
            return c

        self.certify_2afc = certify


def test_wrong_certificates_are_reported_as_violations(night_dir, model, model_path, monkeypatch, capsys):
    import lipsim.cli.evaluate as cli_eval

    monkeypatch.setattr(cli_eval, "_metric", lambda args: _InflatedCertificates(model))
    argv = [
        "attack",
        "night",
        "--data-dir",
        str(night_dir),
        "--model",
        str(model_path),
        "--attack",
        "pgd",
        "--norm",
        "l2",
        "--eps",
        "1.0",
        "--steps",
        "5",
        "--step-size",
        "0.5",
        "--json",
        "--no-progress",
    ]
    assert main(argv) == cli_eval.EXIT_SOUNDNESS
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    assert r["violations"] > 0 and len(r["violation_details"]) >= r["violations"]
    assert "SOUNDNESS BUG" in captured.err


def test_project_to_ball_fixes_rounding_overshoot():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=gen)
    x[0] = 1.0 - 1e-7  # near 1, where float32 spacing (6e-8) is comparable with a tiny ε
    for norm, eps in (("linf", 1e-4), ("linf", 4 / 255), ("l2", 1e-4), ("l2", 0.5)):
        adv = (x + 3 * eps * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        adv[2] = x[2]  # already inside: must come back untouched
        fixed_adv, fixed = project_to_ball(x, adv, eps, norm)
        delta = (fixed_adv.double() - x.double()).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert bool((size <= eps).all()), (norm, eps, size)
        assert fixed.tolist() == [True, True, False] and torch.equal(fixed_adv[2], x[2])
        assert float(size[0]) > 0.5 * eps  # projected, not reset to the clean input
        assert 0 <= float(fixed_adv.min()) and float(fixed_adv.max()) <= 1


# -- attack-distance --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(2)
    for i in range(3):
        _png(root / f"img{i}.png", rng, size=48)
    return root


def test_attack_distance_bound_holds_and_is_stated(image_dir, model_path, tmp_path, capsys):
    out_dir = tmp_path / "hist"
    argv = [
        "attack-distance",
        "--images",
        str(image_dir),
        "--model",
        str(model_path),
        "--eps",
        "0.5",
        "--steps",
        "4",
        "--compare",
        "ssim",
        "--out",
        str(out_dir),
    ]
    code, r = _run_json(capsys, argv)
    assert code == 0 and r["images"] == 3
    # the norm-aware bound ½ρ(ε)², per image: never above ½ε², and held by the attack
    assert 0 < r["bound"] <= 0.125 and r["bound_held"] is True and r["bound_half_eps_squared"] == 0.125
    assert max(r["metrics"]["lipsim"]["values"]) <= r["bound"] + 1e-5
    assert max(r["metrics"]["lipsim"]["values"]) > 0  # the attack did move the embedding
    assert r["metrics"]["lipsim"]["max_delta_l2"] <= 0.5
    assert len(r["metrics"]["ssim"]["values"]) == 3
    png = (out_dir / "distance_hist.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert main([*argv[:-2], "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "½ρ(ε)²" in text and "HELD" in text


def test_attack_distance_fails_loudly_when_bound_is_broken(image_dir, model_path, monkeypatch, capsys):
    import lipsim.evaluate.distance_attack as da

    monkeypatch.setattr(
        da, "distance_bound", lambda metric, x, eps: torch.zeros(x.shape[0], dtype=torch.float64)
    )
    argv = [
        "attack-distance",
        "--images",
        str(image_dir),
        "--model",
        str(model_path),
        "--eps",
        "0.5",
        "--steps",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 4
    captured = capsys.readouterr()
    assert "VIOLATED" in captured.out and "soundness" in captured.err


# -- metrics ----------------------------------------------------------------------------------------
def test_ssim_matches_scikit_image_and_has_gradients():
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 36, generator=gen, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(2):
        ref = structural_similarity(
            x[i].numpy(),
            y[i].numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=0,
        )
        assert float(ours[i]) == pytest.approx(ref, abs=1e-10)
    assert float(ssim(x, x)[0]) == pytest.approx(1.0)
    z = y.clone().requires_grad_(True)
    (1 - ssim(x, z)).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_simple_metrics(model):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 224, 224, generator=gen), torch.rand(2, 3, 224, 224, generator=gen)
    l2 = get_metric("l2")
    assert l2.distance(x, y).tolist() == pytest.approx((x - y).flatten(1).norm(dim=1).tolist(), rel=1e-6)
    assert l2.certify_2afc is None and get_metric("ssim").certify_2afc is None
    lip = get_metric("lipsim", model_source=model)
    assert lip.certified and lip.distance(x, y).tolist() == pytest.approx(model(x, y).tolist())
    assert get_metric("lipsim:arch:tiny-s2d").model.untrained
    with pytest.raises(MetricUnavailable, match="unknown metric"):
        get_metric("psnr")


def test_teacher_metric_is_differentiable():
    try:
        metric = get_metric("teacher:mobilenet_v2")
    except (MetricUnavailable, ImportError, FileNotFoundError, ValueError) as exc:
        pytest.skip(f"teacher unavailable: {exc}")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 224, 224, generator=gen)
    y = torch.rand(2, 3, 224, 224, generator=gen).requires_grad_(True)
    d = metric.distance(x, y)
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert metric.distance(x, x).abs().max() < 1e-5 and metric.certify_2afc is None


def _hide_module(monkeypatch, name):
    real = importlib.util.find_spec

    def fake(module_name, *args, **kwargs):
        return None if module_name == name else real(module_name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_lpips_and_dreamsim_give_one_line_errors(monkeypatch, tmp_path, night_dir, capsys):
    _hide_module(monkeypatch, "lpips")
    with pytest.raises(MetricUnavailable, match=r"package 'lpips' \(pip install lpips\)"):
        get_metric("lpips")
    assert main(["eval", "night", "--data-dir", str(night_dir), "--metric", "lpips"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install lpips" in err
    monkeypatch.undo()

    # the lpips package present but torchvision's backbone weights absent: name the file and folder
    fake_lpips = types.ModuleType("lpips")
    fake_lpips.__spec__ = importlib.machinery.ModuleSpec("lpips", None)
    monkeypatch.setitem(sys.modules, "lpips", fake_lpips)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MetricUnavailable, match="alexnet-owt-7be5be79.pth") as info:
        get_metric("lpips:alex")
    assert str(tmp_path / "hub" / "checkpoints") in str(info.value)
    monkeypatch.undo()

    _hide_module(monkeypatch, "dreamsim")
    with pytest.raises(MetricUnavailable, match=r"package 'dreamsim' \(pip install dreamsim\)"):
        get_metric("dreamsim")
    monkeypatch.undo()

    # the dreamsim package present but no weights: the weights folder is named
    fake = types.ModuleType("dreamsim")
    fake.__spec__ = importlib.machinery.ModuleSpec("dreamsim", None)
    monkeypatch.setitem(sys.modules, "dreamsim", fake)
    monkeypatch.setenv("LIPSIM_DREAMSIM_CACHE", str(tmp_path / "ds"))
    try:
        import lipsim.teachers  # noqa: F401
    except ImportError:
        pytest.skip("lipsim.teachers not available")
    with pytest.raises(MetricUnavailable, match="dreamsim") as info:
        get_metric("dreamsim")
    assert str(tmp_path / "ds") in str(info.value) and "\n" not in str(info.value)


def test_eval_on_make_2afc_output_reports_families(image_dir, model_path, tmp_path, capsys):
    syn = tmp_path / "syn"
    assert main(["make-2afc", "--images", str(image_dir), "--out", str(syn), "--n", "6", "--size", "48"]) == 0
    capsys.readouterr()
    with open(syn / "data.csv", newline="") as fh:
        families = [r["family"] for r in csv.DictReader(fh)]
    code, out = _run_json(capsys, ["eval", "night", "--data-dir", str(syn), "--model", str(model_path)])
    assert code == 0 and out["n"] == 6
    assert {k: v["n"] for k, v in out["families"].items()} == {f: families.count(f) for f in set(families)}
    assert any("synthetic" in c for c in out["caveats"])
