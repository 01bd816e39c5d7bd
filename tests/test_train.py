"""Training: losses, schedule, the loop's checkpoints/resume (bit-exact on CPU), crashes and signals,
torchrun with two CPU processes, fine-tuning on a make-2afc folder and on a published-style checkpoint.

Everything runs on tiny data built in tmp_path with the ``tiny``/``tiny-s2d`` architectures and a
small frozen fake teacher (a module written to disk so that subprocesses can import it too).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lipsim
from conftest import FAKE_TEACHER, importable_module, subprocess_env
from lipsim.cli import main as cli_main
from lipsim.train import (
    DistillConfig,
    DistillTask,
    FinetuneConfig,
    LoopConfig,
    LRSchedule,
    distill_loss,
    hinge_loss,
    load_checkpoint,
    rmse,
    run_distill,
    run_finetune,
    train,
)
from lipsim.train.distributed import DistEnv


@pytest.fixture(scope="module")
def fake_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake_teacher")
    with importable_module(folder, "lipsim_fake_teacher", FAKE_TEACHER) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six small synthetic photos (different sinusoid patterns) in two sub-folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:72, 0:96] / 72.0
    for i in range(6):
        phase = rng.random(3) * 6
        freq = 1 + rng.random(2) * 4
        arr = np.stack([np.sin(xx * freq[0] + yy * freq[1] + phase[c]) * 0.5 + 0.5 for c in range(3)], -1)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray((arr * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _distill_cfg(photos, out, **kw) -> DistillConfig:
    base = dict(
        data_dir=str(photos), teacher="fake", arch="tiny-s2d", out=str(out), steps=8, batch_size=2,
        views="random-resized", num_workers=0, checkpoint_every=3, log_every=1, progress=False, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


# -- losses and schedule ----------------------------------------------------------------------
def test_hinge_loss_matches_hand_computation():
    d0 = torch.tensor([0.30, 0.10, 0.50, 0.25, 0.90])
    d1 = torch.tensor([0.10, 0.40, 0.50, 0.30, 0.20])
    y = torch.tensor([1.0, 0.0, 0.5, 0.7, 0.2])
    # logit = d0 - d1 = [0.2, -0.3, 0, -0.05, 0.7]; ŷ = 2·round(y) - 1 = [1, -1, -1 (0.5 -> 0), 1, -1]
    # max(0, 0.2 - logit·ŷ) = [0, 0, 0.2, 0.25, 0.9]; sum = 1.35
    loss = hinge_loss(d0, d1, y, margin=0.2)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(1.35, abs=1e-6)
    assert hinge_loss(d0, d1, y, margin=0.0).item() == pytest.approx(0.05 + 0.7, abs=1e-6)
    # gradient pushes d1 down when x1 should be closer
    a = torch.tensor([0.3], requires_grad=True)
    b = torch.tensor([0.3], requires_grad=True)
    hinge_loss(a, b, torch.tensor([1.0]), 0.5).backward()
    assert a.grad.item() == -1.0 and b.grad.item() == 1.0


def test_rmse_and_distill_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert rmse(pred, target).item() == pytest.approx(((0 + 4 + 9 + 0) / 4) ** 0.5)
    loss, ra, rb = distill_loss(pred, target, target)
    assert rb.item() == 0.0 and loss.item() == pytest.approx(ra.item() / 2)


def test_lr_schedules():
    cos = LRSchedule("cosine", total=100, warmup=10)
    assert cos(0) == 0.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-12)
    tri = LRSchedule("triangular", total=100, warmup=0)
    assert [tri(s) for s in (0, 20, 40, 80, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.05, 0.0])
    assert LRSchedule("constant", total=10, warmup=0)(7) == 1.0


# -- learning ---------------------------------------------------------------------------------
def test_distill_loss_decreases_on_a_fixed_batch(photos, fake_module):
    module, _ = fake_module
    cfg = _distill_cfg(photos, "unused")
    task = DistillTask(cfg, module.FakeTeacher(), DistEnv())
    batch = torch.utils.data.default_collate([task.dataset[i] for i in range(3)])
    net = task.model.backbone.train()
    opt = torch.optim.Adam(net.parameters(), lr=0.003, betas=(0.5, 0.9))
    losses = []
    for _ in range(20):
        loss, stats = task.compute(net, batch, DistEnv())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert stats["target_norm"].item() == pytest.approx(1.0, abs=1e-5)
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], losses


def test_distillation_targets_stay_float32_under_autocast(photos, fake_module):
    """The loop runs the step under autocast with --amp (bf16 on GPUs); the teacher must not:
    bf16 targets were 18-23 % off the float32 teacher (MobileNetV2)."""
    module, _ = fake_module
    task = DistillTask(_distill_cfg(photos, "unused"), module.FakeTeacher(), DistEnv())
    view = torch.utils.data.default_collate([task.dataset[i] for i in range(2)])["view_a"]
    exact = task._targets(view, ["a", "b"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = task._targets(view, ["a", "b"])
    assert under_amp.dtype == torch.float32 and torch.equal(under_amp, exact)


# -- checkpoints, resume, crashes -------------------------------------------------------------
def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def _losses(run: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_resume_and_crash_reach_the_uninterrupted_weights(tmp_path, photos, fake_module):
    module, _ = fake_module
    full = tmp_path / "full"
    result = run_distill(_distill_cfg(photos, full), teacher=module.FakeTeacher())
    assert not result.interrupted and result.step == 8
    reference = _weights(full)
    for name in ("config.json", "metrics.jsonl", "loss.png", "checkpoints/last.pt", "model.safetensors"):
        assert (full / name).is_file(), name
    assert sorted(_losses(full)) == list(range(1, 9))
    record = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "images_per_s", "wall"} <= set(record)

    # the checkpoint holds only weights-only data
    raw = torch.load(full / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng", "config"} <= set(raw)
    assert raw["step"] == 8 and isinstance(raw["rng"]["torch"], torch.Tensor)

    # graceful stop mid-epoch (3 steps per epoch; stop at 4), then resume with a data worker
    stopped = tmp_path / "stopped"
    first = run_distill(_distill_cfg(photos, stopped, stop_after=4), teacher=module.FakeTeacher())
    assert first.interrupted and first.step == 4 and first.model_path is None
    assert load_checkpoint(first.checkpoint)["batch_in_epoch"] == 1
    run_distill(_distill_cfg(photos, stopped, resume=True, num_workers=1), teacher=module.FakeTeacher())
    resumed = _weights(stopped)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert _losses(stopped) == _losses(full)

    # a crash (exception in the 7th step's teacher call) after the checkpoint of step 6
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_distill(_distill_cfg(photos, crashed), teacher=module.FakeTeacher(fail_after=6))
    assert load_checkpoint(crashed / "checkpoints" / "last.pt")["step"] == 6
    assert not (crashed / "model.safetensors").exists()
    run_distill(_distill_cfg(photos, crashed, resume=True), teacher=module.FakeTeacher())
    assert all(torch.equal(reference[k], _weights(crashed)[k]) for k in reference)

    model = lipsim.load(full / "model.safetensors")
    assert model.embedding == "append" and model.backbone.out_dim == 16 and model.arch == "tiny-s2d"

    # resuming with a different trajectory option, or starting over an existing run, is refused
    with pytest.raises(ValueError, match="lr"):
        run_distill(_distill_cfg(photos, full, resume=True, lr=0.5), teacher=module.FakeTeacher())
    with pytest.raises(ValueError, match="already holds a run"):
        run_distill(_distill_cfg(photos, full), teacher=module.FakeTeacher())


def test_a_diverging_run_stops_without_checkpointing_spoilt_weights(tmp_path, photos, fake_module):
    from lipsim.train import DivergedError

    module, _ = fake_module
    out = tmp_path / "nan"
    cfg = _distill_cfg(photos, out, target_scale=1e30, steps=3, checkpoint_every=1, log_every=2)
    with pytest.raises(DivergedError, match="NaN or infinite"):
        run_distill(cfg, teacher=module.FakeTeacher())
    assert not (out / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda c: c.update(step=10**9), "step 1000000000 of"),  # would "finish" an untrained run
        (lambda c: c.update(step=-5), "step -5"),
        (lambda c: c.pop("rng"), "'rng'"),
        (lambda c: c.update(optimizer={}), "damaged training checkpoint"),
        (lambda c: c["rng"].update(numpy={}), "damaged training checkpoint"),
        (lambda c: c["model"].pop(next(iter(c["model"]))), "do not match"),
        (lambda c: c["model"][next(iter(c["model"]))].fill_(float("nan")), "NaN"),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_and_kept(tmp_path, photos, fake_module, tamper, message):
    from lipsim.train.finetune import load_init

    module, _ = fake_module
    out = tmp_path / "run"
    run_distill(_distill_cfg(photos, out, steps=3, stop_after=1), teacher=module.FakeTeacher())
    path = out / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    tamper(ckpt)
    torch.save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message) as info:
        run_distill(_distill_cfg(photos, out, steps=3, resume=True), teacher=module.FakeTeacher())
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before  # nothing lost: the run can be repaired or restarted
    if message in ("do not match", "NaN"):  # a damaged checkpoint as --init of a fine-tuning
        with pytest.raises(ValueError, match=message):
            load_init(str(path))


def test_resuming_with_another_teacher_is_refused(tmp_path, photos, fake_module):
    module, _ = fake_module
    out = tmp_path / "run"
    run_distill(_distill_cfg(photos, out, steps=3, stop_after=1), teacher=module.FakeTeacher())
    other = module.FakeTeacher()
    other.name = "another-teacher"  # same dimension: only its identity differs
    with pytest.raises(ValueError, match="teacher_name"):
        run_distill(_distill_cfg(photos, out, steps=3, resume=True), teacher=other)


def test_sigkilled_cli_run_leaves_a_loadable_checkpoint_and_resumes(tmp_path, photos, fake_module):
    _, folder = fake_module
    out = tmp_path / "killed"
    args = [
        sys.executable, "-m", "lipsim", "train", "distill", "--data-dir", str(photos),
        "--teacher", "py:lipsim_fake_teacher:build", "--arch", "tiny-s2d", "--out", str(out),
        "--steps", "24", "--batch-size", "2", "--views", "random-resized", "--num-workers", "0",
        "--checkpoint-every", "2", "--log-every", "1", "--device", "cpu", "--no-progress", "--quiet",
    ]  # fmt: skip
    proc = subprocess.Popen(args, env=subprocess_env(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert ckpt.exists(), "no checkpoint appeared before the kill"
    state = load_checkpoint(ckpt)
    assert 2 <= state["step"] < 24
    assert not (out / "model.safetensors").exists()
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"]  # no temp file left behind

    done = subprocess.run(
        args + ["--resume", "--json"],
        env=subprocess_env(folder),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 24
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # lines logged after the last checkpoint were replaced
    assert lipsim.load(out).backbone.out_dim == 16


def test_sigterm_checkpoints_and_exits(tmp_path, photos, fake_module):
    _, folder = fake_module
    out = tmp_path / "term"
    args = [
        sys.executable, "-m", "lipsim", "train", "distill", "--data-dir", str(photos),
        "--teacher", "py:lipsim_fake_teacher:build", "--arch", "tiny-s2d", "--out", str(out),
        "--steps", "1000", "--batch-size", "2", "--num-workers", "1", "--checkpoint-every", "0",
        "--log-every", "1", "--device", "cpu", "--no-progress", "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, env=subprocess_env(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    result = json.loads(stdout)
    assert result["interrupted"] and result["signal"] == signal.SIGTERM
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == result["step"] >= 1


def test_global_batch_must_divide_among_processes(tmp_path, photos, fake_module):
    module, _ = fake_module
    cfg = _distill_cfg(photos, tmp_path / "x", batch_size=3)
    task = DistillTask(cfg, module.FakeTeacher(), DistEnv())
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        train(task, cfg, DistEnv(world_size=2, rank=0))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(task, _distill_cfg(photos, tmp_path / "y", batch_size=64), DistEnv())
    with pytest.raises(ValueError, match="steps or epochs"):
        LoopConfig(out="z").validate()


@pytest.mark.parametrize("n_items, batch", [(11, 4), (95, 32), (63, 32), (64, 32)])
def test_an_epoch_is_the_same_distinct_items_for_any_number_of_processes(n_items, batch):
    """With n not a multiple of the batch, the padded sampler used to give 2 processes more steps
    (items seen twice) than 1, and resuming across process counts was refused."""
    from lipsim.train.loop import ResumableSampler, epoch_steps

    steps = epoch_steps(n_items, batch)
    seen = {}
    for world in (1, 2, 4):
        per_rank = batch // world
        shares = [list(ResumableSampler(range(n_items), world, rank, seed=5)) for rank in range(world)]
        window = [slice(j * per_rank, (j + 1) * per_rank) for j in range(steps)]
        batches = [sorted(i for share in shares for i in share[w]) for w in window]
        items = [i for b in batches for i in b]
        assert len(items) == len(set(items)) == steps * batch  # distinct, whole batches
        seen[world] = batches
    assert seen[1] == seen[2] == seen[4]


def test_torchrun_two_cpu_processes_with_resume(tmp_path, photos, fake_module):
    _, folder = fake_module
    out = tmp_path / "ddp"
    base = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "lipsim", "train", "distill", "--data-dir", str(photos),
        "--teacher", "py:lipsim_fake_teacher:build", "--arch", "tiny-s2d", "--out", str(out),
        "--steps", "6", "--batch-size", "4", "--views", "random-resized", "--num-workers", "0",
        "--checkpoint-every", "2", "--log-every", "1", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = subprocess_env(folder)
    first = subprocess.run(base + ["--stop-after", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3
    second = subprocess.run(
        base + ["--resume", "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(second.stdout.strip().splitlines()) == 1  # only rank 0 prints
    assert json.loads(second.stdout)["step"] == 6
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["per_process_batch"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert lipsim.load(out / "model.safetensors").backbone.out_dim == 16


# -- fine-tuning ------------------------------------------------------------------------------
def test_finetune_on_a_make_2afc_folder_after_distillation(tmp_path, photos, fake_module, capsys):
    from lipsim.data import make_2afc

    module, _ = fake_module
    night = tmp_path / "night"
    make_2afc(photos, night, n=8, seed=0, split="train", size=48)
    distilled = tmp_path / "distilled"
    run_distill(_distill_cfg(photos, distilled, steps=2, checkpoint_every=0), teacher=module.FakeTeacher())

    out = tmp_path / "ft"
    code = cli_main([
        "train", "finetune", "--dataset", "night", "--data-dir", str(night), "--init", str(distilled),
        "--margin", "0.2", "--out", str(out), "--epochs", "2", "--batch-size", "4", "--num-workers", "0",
        "--log-every", "1", "--device", "cpu", "--no-progress", "--init-optimizer", "--json",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["step"] == 4  # 8 triplets / batch 4 × 2 epochs
    model = lipsim.load(out / "model.safetensors")
    assert model.embedding == "append" and model.arch == "tiny-s2d" and model.backbone.out_dim == 16
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "finetune" and config["task.margin"] == 0.2 and config["lr"] == 1e-3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["2afc"] <= 1.0 and r["loss"] >= 0 for r in records)
    cert = model.certify_2afc(*(torch.rand(1, 3, 224, 224) for _ in range(3)))
    assert cert.radius.shape == (1,)


def test_finetune_from_a_published_style_checkpoint_switches_to_append(tmp_path, photos, caplog):
    from lipsim.archs import ArchConfig
    from lipsim.data import make_2afc

    night = tmp_path / "night"
    make_2afc(photos, night, n=4, seed=1, split="train", size=48)
    # a published-layout .pth (module.model. prefix, duplicated base.* keys, optimizer_state_dict)
    config = ArchConfig(
        "pub-test", "published", out_dim=1792, depth=1, channels=10, conv_size=2, depth_linear=1, n_features=8
    )
    model = lipsim.LipSim.from_config(config, embedding="plain")
    opt = torch.optim.Adam(model.backbone.parameters(), lr=0.01, betas=(0.5, 0.9))
    model.backbone(torch.rand(1, 3, 224, 224)).square().mean().backward()
    opt.step()
    state = {}
    for key, value in model.backbone.state_dict().items():
        state[f"module.model.{key}"] = value
        if key.startswith("convs."):
            state[f"module.model.base.1.{key[6:]}"] = value
        elif key.startswith("linear."):
            state[f"module.model.base.2.{key[7:]}"] = value
    pth = tmp_path / "model.ckpt-1.pth"
    torch.save(
        {"epoch": 1, "global_step": 1, "model_state_dict": state, "optimizer_state_dict": opt.state_dict()},
        pth,
    )

    cfg = FinetuneConfig(
        dataset="night", data_dir=str(night), init=str(pth), out=str(tmp_path / "ft"), steps=2, batch_size=2,
        margin=0.5, num_workers=0, progress=False, device="cpu", init_optimizer=True,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="lipsim.train"):
        result = run_finetune(cfg)
    assert any("switched from 'plain' to 'append'" in r.message for r in caplog.records)
    assert any("Adam moments restored" in r.message for r in caplog.records)
    tuned = lipsim.load(result.model_path)
    assert tuned.embedding == "append" and tuned.backbone.out_dim == 1792


# -- teachers from lipsim.teachers ------------------------------------------------------------
def test_distill_from_an_embedding_cache(tmp_path, photos, fake_module):
    teachers = pytest.importorskip("lipsim.teachers")
    from lipsim.data import ImageFolderDataset

    module, _ = fake_module
    cache = tmp_path / "cache"
    teachers.build_embedding_cache(
        module.FakeTeacher(), ImageFolderDataset(photos, size=224), cache, progress=False
    )
    out = tmp_path / "cached"
    result = run_distill(_distill_cfg(photos, out, teacher=str(cache), steps=3))
    assert not result.interrupted
    config = json.loads((out / "config.json").read_text())
    assert config["task.teacher_cached"] is True and config["task.teacher_dim"] == 16


def test_distill_with_mobilenet_v2_teacher(tmp_path, photos):
    teachers = pytest.importorskip("lipsim.teachers")
    try:
        teacher = teachers.get_teacher("mobilenet_v2")
    except Exception as exc:  # weights package missing
        pytest.skip(f"mobilenet_v2 teacher unavailable: {exc}")
    with pytest.raises(ValueError, match="feature width"):
        run_distill(_distill_cfg(photos, tmp_path / "narrow", arch="tiny", steps=1), teacher=teacher)
    result = run_distill(_distill_cfg(photos, tmp_path / "mb", steps=2, teacher="mobilenet_v2"))
    assert lipsim.load(result.model_path).backbone.out_dim == teacher.dim


def test_cli_errors_are_one_line(tmp_path, photos, capsys):
    code = cli_main([
        "train", "distill", "--data-dir", str(photos), "--teacher", "fake", "--arch", "tiny-s2d",
        "--out", str(tmp_path / "none"), "--steps", "2", "--resume", "--device", "cpu",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "nothing to resume" in err
    code = cli_main([
        "train", "distill", "--data-dir", str(photos), "--teacher", "py:nowhere_module:build",
        "--arch", "tiny-s2d", "--out", str(tmp_path / "bad"), "--steps", "2", "--device", "cpu",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "cannot import" in err


def test_cli_training_choices_match_the_loop():
    from lipsim.cli import train as cli_train
    from lipsim.train import loop

    assert cli_train.SCHEDULES == loop.SCHEDULES
    assert cli_train.AMP_MODES == loop.AMP_MODES


def test_stop_flag_second_signal_goes_to_the_previous_handler():
    """First SIGTERM: only a request to stop; second: the handler that was there before runs."""
    from lipsim.train.step import StopFlag

    calls = []

    def custom(signum, frame):
        calls.append(signum)

    before = signal.signal(signal.SIGTERM, custom)
    try:
        flag = StopFlag()
        flag.install()
        signal.raise_signal(signal.SIGTERM)
        assert flag.requested and calls == []
        signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is custom  # restored
    finally:
        signal.signal(signal.SIGTERM, before)
