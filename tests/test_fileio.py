"""The one atomic-write helper every writer uses."""

import os
import stat

import pytest

from lipsim.fileio import atomic_write, write_text_atomic


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("old"))
    assert target.read_text() == "old"

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    target = tmp_path / "g.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"x"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_text_and_figures_are_written_atomically(tmp_path):
    from lipsim.evaluate import report

    write_text_atomic(tmp_path / "r.json", '{"a": 1}\n')
    assert (tmp_path / "r.json").read_text() == '{"a": 1}\n'
    # savefig to a temporary name must still pick the format from the target's suffix
    out = report.plot_distance_histogram({"m": [0.1, 0.2, 0.2]}, 0.5, 0.125, tmp_path / "h.png", "bound")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "r.json"]


def test_unreadable_model_paths_are_checkpoint_errors(tmp_path):
    from lipsim.errors import CheckpointError
    from lipsim.modelfiles import resolve_model_path

    with pytest.raises(CheckpointError, match="cannot read"):
        resolve_model_path(str(tmp_path / ("x" * 300 + ".safetensors")))
