"""Published checkpoints by name: download once into the cache, hash recorded and checked, offline help.

No test touches the network: downloads are a fake downloader or a local mirror folder.
"""

import json
import shutil
import sys

import pytest
import torch

import lipsim
from conftest import published_file
from lipsim import hub
from lipsim.checkpoints import load_published
from lipsim.cli import main
from lipsim.errors import CheckpointError

NAME = "lipsim-test-tiny"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A cache folder of its own and a registry entry for a tiny published-layout checkpoint."""
    monkeypatch.setenv("LIPSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LIPSIM_MIRROR", raising=False)
    entry = hub.PublishedModel(NAME, "model.ckpt-7_margin=0.3.pth", "drive-id-of-test", "test", out_dim=64)
    monkeypatch.setitem(hub.PUBLISHED, NAME, entry)
    source = tmp_path / "served" / entry.filename
    source.parent.mkdir()
    published_file(lipsim.create_model("tiny", seed=0), source)
    return entry, source


def _fake_downloader(source, calls):
    def download(drive_id, output):
        calls.append(drive_id)
        shutil.copyfile(source, output)

    return download


def _block_gdown(monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)  # import gdown -> ImportError


def test_the_published_names_point_at_the_authors_links():
    assert {"lipsim-pretrained", "lipsim-margin-0.2", "lipsim-margin-0.5"} <= set(hub.PUBLISHED)
    ids = {name: hub.PUBLISHED[name].drive_id for name in ("lipsim-margin-0.2", "lipsim-margin-0.5")}
    assert ids == {  # the links that replaced the first ones on 2024-02-26
        "lipsim-margin-0.2": "1OHRP0uwFrRJ6zXsPrCUDxlTjALa_690c",
        "lipsim-margin-0.5": "11JoY5jrm4qmk0QmncQ5eVqXQpXQNLG1X",
    }
    assert all(m.embedding == "plain" and m.out_dim == 1792 for m in hub.PUBLISHED.values())


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIPSIM_CACHE", str(tmp_path / "x"))
    assert hub.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LIPSIM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / ".cache" / "lipsim"


def test_downloads_once_records_the_hash_and_loads_by_name(registry, monkeypatch, images):
    entry, source = registry
    calls = []
    monkeypatch.setattr(hub, "_gdown_download", _fake_downloader(source, calls))
    monkeypatch.setitem(sys.modules, "gdown", type(sys)("gdown"))  # "installed"
    model = lipsim.load(NAME)
    cached = hub.cache_dir() / entry.filename
    assert calls == ["drive-id-of-test"] and cached.is_file()
    record = json.loads((cached.parent / (cached.name + ".sha256.json")).read_text())
    assert record["sha256"] == hub.sha256_of(source) and record["name"] == NAME
    again = lipsim.load(NAME)
    assert calls == ["drive-id-of-test"]  # from the cache, not downloaded again
    reference = load_published(source, out_dim=64)
    assert model.embedding == "plain" and model.config.out_dim == 64
    x, y = images[:2], images[2:]
    assert torch.equal(model(x, y), reference(x, y)) and torch.equal(again(x, y), reference(x, y))


def test_a_changed_cached_file_is_refused_in_one_line(registry, monkeypatch):
    entry, source = registry
    hub.fetch(NAME, downloader=_fake_downloader(source, []))
    cached = hub.cache_dir() / entry.filename
    with open(cached, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        lipsim.load(NAME)
    assert "\n" not in str(info.value) and "download" in str(info.value)


def test_a_known_hash_is_enforced_from_the_first_use(registry, monkeypatch):
    entry, source = registry
    monkeypatch.setitem(hub.PUBLISHED, NAME, hub.PublishedModel(**{**entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="SHA-256"):
        hub.fetch(NAME, downloader=_fake_downloader(source, []))


def test_offline_says_where_to_put_the_file(registry, monkeypatch):
    entry, _ = registry

    def offline(drive_id, output):
        raise OSError("Failed to establish a new connection: Name or service not known")

    monkeypatch.setattr(hub, "_gdown_download", offline)
    monkeypatch.setitem(sys.modules, "gdown", type(sys)("gdown"))
    with pytest.raises(CheckpointError) as info:
        lipsim.load(NAME)
    msg = str(info.value)
    assert "\n" not in msg and str(hub.cache_dir() / entry.filename) in msg and entry.url in msg
    assert "download failed" in msg
    assert not hub.cache_dir().exists() or not any(hub.cache_dir().iterdir())  # nothing half-written


def test_without_gdown_the_message_names_the_extra_and_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("LIPSIM_CACHE", str(tmp_path))
    monkeypatch.delenv("LIPSIM_MIRROR", raising=False)
    _block_gdown(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        lipsim.load("lipsim-margin-0.5")
    msg = str(info.value)
    assert "\n" not in msg and "lipsim[download]" in msg
    assert str(tmp_path / "model.ckpt-435_margin=0.5.pth") in msg
    assert "11JoY5jrm4qmk0QmncQ5eVqXQpXQNLG1X" in msg


def test_a_download_that_is_not_a_checkpoint_is_not_cached(registry):
    def html(drive_id, output):
        with open(output, "w") as fh:
            fh.write("<!DOCTYPE html><html>Quota exceeded</html>")

    with pytest.raises(CheckpointError, match="not return a PyTorch checkpoint"):
        hub.fetch(NAME, downloader=html)
    assert not (hub.cache_dir() / registry[0].filename).exists()


def test_local_mirror_folder_loads_by_name_through_the_cache(registry, monkeypatch, images):
    entry, source = registry
    monkeypatch.setenv("LIPSIM_MIRROR", str(source.parent))
    _block_gdown(monkeypatch)  # the mirror needs no downloader
    model = lipsim.load(NAME)
    cached = hub.cache_dir() / entry.filename
    assert cached.is_file() and hub._read_record(cached) == hub.sha256_of(source)
    assert torch.equal(
        model(images[:1], images[1:2]), load_published(source, out_dim=64)(images[:1], images[1:2])
    )


def test_a_file_put_in_the_cache_by_hand_is_used_and_its_hash_recorded(registry, monkeypatch):
    entry, source = registry
    _block_gdown(monkeypatch)
    hub.cache_dir().mkdir(parents=True)
    shutil.copyfile(source, hub.cache_dir() / entry.filename)
    assert lipsim.load(NAME).arch == "tiny"
    assert hub._read_record(hub.cache_dir() / entry.filename) == hub.sha256_of(source)


def test_models_command_lists_packaged_cached_and_downloadable(registry, capsys):
    entry, source = registry
    hub.fetch(NAME, downloader=_fake_downloader(source, []))
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cache"] == str(hub.cache_dir())
    assert {m["name"] for m in out["downloadable"]} >= {"lipsim-margin-0.5", "lipsim-margin-0.2", NAME}
    assert [m["name"] for m in out["cached"]] == [NAME]
    assert out["cached"][0]["sha256"] == hub.sha256_of(source)
    assert isinstance(out["packaged"], list)
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "lipsim-margin-0.5" in text and NAME in text and "cached" in text
