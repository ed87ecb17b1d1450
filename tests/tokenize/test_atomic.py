"""Atomic outputs are durable: the data is fsynced before the rename, the directory after it.

Without the first fsync, a machine crash soon after the rename can leave the new name on an empty file
(delayed allocation); the tests record the order of ``fsync`` and ``os.replace`` calls.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from geneformer_workflow import atomic as _atomic
from geneformer_workflow.atomic import atomic_path, write_json_atomic, write_text_atomic


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, int | str]]:
    """``("fsync", inode)`` and ``("replace", target name)`` in call order."""
    calls: list[tuple[str, int | str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    monkeypatch.setattr(_atomic.os, "replace", replace)
    return calls


def test_a_file_is_fsynced_before_the_rename_and_its_directory_after(tmp_path, events):
    target = tmp_path / "out" / "table.tsv"
    with atomic_path(target) as tmp:
        tmp.write_text("a\t1\n")
        inode = tmp.stat().st_ino
    assert target.read_text() == "a\t1\n" and target.stat().st_ino == inode
    assert events == [("fsync", inode), ("replace", "table.tsv"), ("fsync", target.parent.stat().st_ino)]


def test_every_file_of_a_directory_output_is_fsynced_before_the_rename(tmp_path, events):
    target = tmp_path / "vocab"
    with atomic_path(target) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "token_dictionary.json").write_text("{}")
        (tmp / "sub" / "vocab.txt").write_text("<pad>\n")
    renamed = events.index(("replace", "vocab"))
    synced_before = {inode for kind, inode in events[:renamed] if kind == "fsync"}
    expected = {p.stat().st_ino for p in (target, target / "sub", target / "token_dictionary.json")}
    assert expected | {(target / "sub" / "vocab.txt").stat().st_ino} <= synced_before
    assert events[renamed + 1 :] == [("fsync", tmp_path.stat().st_ino)]


@pytest.mark.parametrize("write", [write_text_atomic, write_json_atomic], ids=["text", "json"])
def test_a_failing_fsync_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch, write):
    """A full disk often shows only at fsync (delayed allocation): the old output must stay, whole."""
    target = tmp_path / "manifest.json"
    target.write_text('{"old": true}\n')

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write(target, {"new": True} if write is write_json_atomic else "new")
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_directory_that_refuses_fsync_does_not_fail_the_write(tmp_path, monkeypatch):
    """Some platforms and file systems cannot fsync a directory (EINVAL); the file itself was synced."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real_fsync(fd)

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    write_text_atomic(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x"
