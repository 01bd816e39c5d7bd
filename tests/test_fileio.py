"""The one atomic-write helper every writer uses."""

import os
import stat

import pytest

from lipsim.fileio import atomic_write


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
