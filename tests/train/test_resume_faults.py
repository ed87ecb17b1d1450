"""What a killed or failed run leaves behind must not stop the next one.

``metrics.jsonl`` may end in a partial line (kill, full disk): resume drops it with a warning, and refuses
clearly only when a line before the last is broken. The token cache build leaves ``.tmp-<fingerprint>-<host>-<pid>``
directories when killed: the next build removes those of dead processes on this host, and a build that cannot
write names the cache directory, the problem and the fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from geneformer_workflow.train import main
from geneformer_workflow.train.corpus import CacheWriteError, build_cache, corpus_fingerprint
from geneformer_workflow.train.metrics import truncate_metrics

from .conftest import compose, mounted_tmpfs, read_metrics, subprocess_env

SPLITS = {"train": "train", "validation": "validation"}


def write_records(path: Path, steps: range, tail: bytes = b"") -> list[bytes]:
    """One metrics record per step (as ``MetricsLogger`` writes them), then ``tail`` (e.g. a partial line)."""
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}).encode() + b"\n" for s in steps]
    path.write_bytes(b"".join(lines) + tail)
    return lines


PARTIAL_TAILS = {
    "cut-mid-record": b'{"step": 6, "train/lo',
    "cut-mid-number": b'{"step": 6, "train/loss": 0.16',
    "nul-blocks": b"\0" * 64,  # a crash can leave the file's last block zero-filled
    "torn-utf8": b'{"step": 6, "x": "\xe2\x82',
}


@pytest.mark.parametrize("tail", PARTIAL_TAILS.values(), ids=PARTIAL_TAILS.keys())
def test_resume_drops_a_partial_last_metrics_line_with_a_warning(tmp_path, caplog, tail):
    path = tmp_path / "metrics.jsonl"
    lines = write_records(path, range(1, 6), tail)
    with caplog.at_level(logging.WARNING):
        truncate_metrics(tmp_path, 4)
    assert path.read_bytes() == b"".join(lines[:4])  # records up to the checkpoint, byte for byte
    assert f"{path}: dropping line 6, a partial record" in caplog.text


def test_resume_keeps_a_complete_last_record_without_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = write_records(path, range(1, 4))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    truncate_metrics(tmp_path, 10)
    assert path.read_bytes() == b"".join(lines)  # the newline is back, so the next record starts a new line


def test_resume_refuses_a_corrupt_line_before_the_last_naming_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = write_records(path, range(1, 6))
    lines[2] = b'{"step": 3, "train/lo\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: line 3 of 5 is not a JSON record"):
        truncate_metrics(tmp_path, 4)
    assert path.read_bytes() == b"".join(lines)  # left for the user to inspect


def test_resume_leaves_an_intact_metrics_file_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 4))
    before = path.stat()
    truncate_metrics(tmp_path, 3)
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns


def test_training_resumes_after_a_partial_metrics_line_and_logs_every_step_once(small_corpus, tmp_path, caplog):
    run = ("scheduler.decay_steps=8", "checkpoint.save_every=2")
    main(compose(small_corpus, tmp_path, *run, "training.max_steps=2"))
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("ab") as handle:  # step 3 was being logged when the job died
        handle.write(b'{"step": 3, "train/loss": 7.1')
    with caplog.at_level(logging.WARNING):
        main(compose(small_corpus, tmp_path, *run, "training.max_steps=4"))
    assert re.search(rf"{re.escape(str(metrics))}: dropping line \d+, a partial record", caplog.text)
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [1, 2, 3, 4]  # each step once


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_build_removes_temporary_dirs_of_dead_builds_on_this_host_only(small_corpus, tmp_path, live_process):
    fingerprint = corpus_fingerprint(small_corpus.files, SPLITS)
    host = socket.gethostname()
    dead = tmp_path / f".tmp-{fingerprint}-{host}-{dead_pid()}"
    other_corpus = tmp_path / f".tmp-{'0' * 16}-{host}-{dead_pid()}"
    running = tmp_path / f".tmp-{fingerprint}-{host}-{live_process.pid}"
    other_host = tmp_path / f".tmp-{fingerprint}-{host}-x-{dead_pid()}"  # e.g. node "<host>-x" of a shared disk
    for path in (dead, other_corpus, running, other_host):
        path.mkdir()
        (path / "train.tokens.npy").write_bytes(b"half")
    cache = build_cache(small_corpus.files, tmp_path, SPLITS)
    assert (cache / "store.json").is_file()
    assert not dead.exists() and not other_corpus.exists()
    assert running.is_dir() and other_host.is_dir()  # a build in progress; a host whose processes we cannot see


CACHE_BUILD_UNDER_A_FILE_SIZE_LIMIT = """
import json, resource, signal, sys
from pathlib import Path
from geneformer_workflow.train.corpus import CacheWriteError, build_cache

files, cache_root, splits = json.loads(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a nearly full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    build_cache([Path(f) for f in files], Path(cache_root), splits)
except CacheWriteError as err:
    print(err)
    sys.exit(3)
"""


def test_a_failed_cache_write_names_the_directory_the_problem_and_the_fix(small_corpus, tmp_path):
    # The limit applies to every file the process writes (pytest's own output too), so only a child gets it.
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    arguments = json.dumps([[str(f) for f in small_corpus.files], str(cache_root), SPLITS])
    proc = subprocess.run(
        [sys.executable, "-c", CACHE_BUILD_UNDER_A_FILE_SIZE_LIMIT, arguments],
        env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    message = proc.stdout.strip()
    assert message.startswith(f"cannot write the token cache in {cache_root} (data.cache_dir): ")
    assert "File too large" in message and "set data.cache_dir to a directory on a disk with room" in message
    assert list(cache_root.iterdir()) == []  # no temporary directory, no cache that looks complete


@pytest.mark.parametrize(("code", "problem"), [(errno.ENOSPC, "disk full"), (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_or_quota_during_the_cache_build_is_named(small_corpus, tmp_path, monkeypatch, code, problem):
    from geneformer_workflow.tokenize import store

    def full(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store.np, "save", full)  # the offsets file of the first store part
    with pytest.raises(CacheWriteError, match=rf"\(data\.cache_dir\): .*{problem}.*Free space") as err:
        build_cache(small_corpus.files, tmp_path, SPLITS)
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == code
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MB tmpfs (skipped where mounting is not allowed)."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as mountpoint:
        yield mountpoint


def test_a_really_full_disk_fails_the_cache_build_cleanly_instead_of_killing_it(small_corpus, small_disk):
    """The token array is a memmap: without reserving its blocks first, a full disk kills the process (SIGBUS)."""
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 8_192))
    code = (
        "import sys; from pathlib import Path; from geneformer_workflow.train.corpus import build_cache\n"
        f"build_cache([Path(p) for p in {[str(f) for f in small_corpus.files]!r}], Path({str(small_disk)!r}) / "
        f"'cache', {SPLITS!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # an exception, not a signal (-7 is SIGBUS)
    assert "CacheWriteError: cannot write the token cache" in proc.stderr and "disk full" in proc.stderr
    assert list((small_disk / "cache").iterdir()) == []
