"""Safe, atomic file output: refuse to destroy, write under a temporary name, rename into place on success.

Every output of a command goes through :func:`atomic_path` (one file or directory) or :func:`atomic_files`
(several files that belong together, e.g. a corpus shard and its lengths and manifest):

- **Nothing is destroyed that the command did not create.** Before any work, an output path that is one of the
  command's inputs (or a directory holding one), an existing file or directory inside an input directory (e.g. a
  vocabulary or model directory, even with ``overwrite``), an existing directory where a file is written, or an
  existing output without ``overwrite`` is refused with :class:`OutputError` naming the path and the fix. With
  ``overwrite``, a directory output replaces an existing directory only when every name in the old one is also
  written by the new one (a vocabulary directory over an earlier vocabulary, never over a folder of other files).
- **Outputs appear complete or not at all.** A killed or failed step leaves only a hidden temporary
  (``.NAME.<host>-<pid>.<random>.tmp``, removed by the next run once its writer is dead). The data is fsynced
  before the rename and the directory after it, so a machine crash cannot leave a renamed but short file either
  (without the first fsync the rename may reach the disk before the data does: ext4/XFS delayed allocation).
- **Groups commit in order, the last file last.** Renames of several files cannot be one atomic step, so
  :func:`atomic_files` first removes the old version of the *last* file (the group's commit marker, e.g. the
  manifest), then renames the others, and the marker last. Readers check the marker (see
  ``corpus_index.verify_shard``): a group cut short has no marker, never a new file beside an old marker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

# fsync of a directory is not supported everywhere: Windows cannot open one, some file systems refuse it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTSUP}
_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"

PathLike = str | os.PathLike[str]


class OutputError(ValueError):
    """An output path that would destroy something this command did not create; the message names the fix."""


def check_outputs(
    targets: Sequence[PathLike],
    *,
    inputs: Sequence[PathLike | None] = (),
    overwrite: bool = False,
    directory: bool = False,
) -> None:
    """Refuse output paths that would destroy an input, a directory or (without ``overwrite``) an existing file.

    Call it before any work so that a bad path fails in a second, not after an hour of tokenizing.

    Raises:
        OutputError: naming the path, what it is, and what to pass instead.
    """
    sources = [Path(p) for p in inputs if p is not None]
    for target in map(Path, targets):
        for source in sources:
            if _same_path(target, source):
                msg = f"{target}: the output path is also an input of this command; choose another output path"
                raise OutputError(msg)
            if directory and _inside(source, target):
                msg = (
                    f"{target}: the output directory holds the input {source}, which writing it would delete; "
                    "choose another output directory"
                )
                raise OutputError(msg)
        if not (target.exists() or target.is_symlink()):
            continue
        for source in sources:
            if source.is_dir() and _inside(target, source):  # e.g. -o VOCAB_DIR/token_dictionary.json --overwrite
                msg = (
                    f"{target}: exists inside the input directory {source}, whose files this command reads; "
                    "choose an output path outside it"
                )
                raise OutputError(msg)
        if target.is_dir() and not directory:
            msg = (
                f"{target}: is a directory, but this output is a file; give a file path "
                f"(e.g. {target / 'NAME'}) — an existing directory is never replaced by a file"
            )
            raise OutputError(msg)
        if directory and not target.is_dir():
            msg = f"{target}: exists and is not a directory; choose another output directory"
            raise OutputError(msg)
        if not overwrite:
            msg = f"{target}: already exists; pass --overwrite to replace it, or choose another output path"
            raise OutputError(msg)


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` lies inside ``directory`` (after resolving links)."""
    return directory.resolve() in path.resolve().parents


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that owns temporary ``.NAME.<host>-<pid>.<rand>.tmp`` may still be writing it."""
    owner = tmp_name.removesuffix(".tmp").rsplit(".", 2)[-2] if tmp_name.count(".") >= 3 else ""
    host, _, pid = owner.rpartition("-")
    if host != _HOST or not pid.isdigit():
        return True  # another machine's (shared file system) or an unknown format: leave it alone
    return pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (when in doubt: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists but belongs to another user
        return True
    return True


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporaries of earlier, killed writers of ``target`` (never those of a live writer)."""
    for stale in target.parent.glob(f".{glob_escape(target.name)}.*.tmp"):
        if not _writer_alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def _new_temporary(target: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=target.parent))


@contextlib.contextmanager
def atomic_path(
    path: PathLike,
    *,
    inputs: Sequence[PathLike | None] = (),
    overwrite: bool = True,
    directory: bool = False,
    owned: Callable[[str], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    Args:
        path: The output file or directory.
        inputs: The command's inputs; an output equal to one (or, for a directory, holding one) is refused.
        overwrite: Whether an existing output may be replaced (library default; the CLI defaults to False).
        directory: Whether the output is a directory (the block creates it); an existing directory is never
            replaced by a file output.
        owned: For a directory: names this command writes even when this run does not (e.g. a varying number of
            ``data-NNNNN-of-NNNNN.arrow`` files); an old directory holding only those and rewritten names is
            replaced.

    On error the temporary path is removed and ``path`` is untouched.
    """
    target = Path(path)
    check_outputs([target], inputs=inputs, overwrite=overwrite, directory=directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = _new_temporary(target)
    tmp_target = tmp / target.name
    try:
        yield tmp_target
        fsync_tree(tmp_target)  # the data is on disk before the name is: a crash leaves the old file or the new
        if directory:
            _replace_directory(tmp_target, target, tmp, owned)
        else:
            check_outputs([target], inputs=inputs, overwrite=overwrite)  # a directory that appeared meanwhile
            os.replace(tmp_target, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_directory(new: Path, target: Path, tmp: Path, owned: Callable[[str], bool] | None = None) -> None:
    """Move directory ``new`` to ``target``; an old ``target`` is replaced only if ``new`` rewrites all its names."""
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        return
    if not target.is_dir() or target.is_symlink():
        msg = f"{target}: exists and is not a directory; choose another output directory"
        raise OutputError(msg)
    foreign = sorted(n for n in set(os.listdir(target)) - set(os.listdir(new)) if not (owned and owned(n)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        msg = (
            f"{target}: holds files this command does not write ({shown}); refusing to replace the directory. "
            "Move them away or choose another output directory"
        )
        raise OutputError(msg)
    old = tmp / f"{target.name}.old"
    os.replace(target, old)  # the old directory moves into the temporary, which is removed afterwards
    os.replace(new, target)


@contextlib.contextmanager
def atomic_files(
    paths: Sequence[PathLike], *, inputs: Sequence[PathLike | None] = (), overwrite: bool = True
) -> Iterator[list[Path]]:
    """Yield temporary paths for several output files that belong together; rename them all on success.

    The last path is the group's commit marker (e.g. a manifest): its old version is removed before any new
    file is renamed into place, and the new one is renamed last, so a group cut short by a kill has no marker.
    Each temporary keeps its target's suffix (``savefig`` and friends choose the format by it).
    """
    targets = [Path(p) for p in paths]
    if not targets or len({t.resolve() for t in targets}) != len(targets):
        msg = f"atomic_files needs distinct output files, got {[str(t) for t in targets]}"
        raise ValueError(msg)
    check_outputs(targets, inputs=inputs, overwrite=overwrite)
    temporaries: dict[Path, Path] = {}  # one temporary directory per output directory (renames stay in one fs)
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(target)
            if target.parent not in temporaries:
                temporaries[target.parent] = _new_temporary(target)
        tmp_targets = [temporaries[t.parent] / f"{i}-{t.name}" for i, t in enumerate(targets)]
        yield tmp_targets
        for tmp_target in tmp_targets:
            if not tmp_target.is_file():
                msg = f"atomic_files: the output {tmp_target.name} was not written"
                raise RuntimeError(msg)
            fsync_tree(tmp_target)
        check_outputs(targets, inputs=inputs, overwrite=overwrite)
        targets[-1].unlink(missing_ok=True)  # no old marker may describe the new files
        fsync_dir(targets[-1].parent)
        for tmp_target, target in zip(tmp_targets, targets, strict=True):
            os.replace(tmp_target, target)
        for parent in temporaries:
            fsync_dir(parent)
    finally:
        for tmp in temporaries.values():
            shutil.rmtree(tmp, ignore_errors=True)


# errno values that mean "out of space", and how messages name them (also used for checkpoints and the cache).
NO_SPACE = {
    errno.ENOSPC: "no space left on device (disk full)",
    errno.EDQUOT: "disk quota exceeded (disk full for this user)",
    errno.EFBIG: "a file grew past the file size limit (File too large; see `ulimit -f`)",
}
# Less free space than this after a write failed without an errno means the disk is full.
FULL_BELOW_BYTES = 16 * 2**20
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")  # numpy's message for a short write (errno unset)


def describe_os_error(err: OSError, output: PathLike | None = None) -> str:
    """The message of an ``OSError``, naming a full disk as such.

    numpy reports a write cut short by a full disk as ``"50000 requested and 16352 written"`` without an errno;
    such a message, or an error without errno while ``output``'s file system has almost no space left, is named a
    full disk.
    """
    text = str(err)
    if err.errno in NO_SPACE:
        return f"{NO_SPACE[err.errno]}: {text}"
    free = None
    if output is not None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(next(p for p in (Path(output), *Path(output).parents) if p.exists())).free
    if _SHORT_WRITE.match(text) or (err.errno is None and free is not None and free < FULL_BELOW_BYTES):
        where = f" ({free / 2**20:.1f} MiB free where {output} is written)" if free is not None else ""
        return f"the disk is probably full{where}: a write was cut short ({text}); free space and rerun"
    return text


def fsync_tree(path: PathLike) -> None:
    """``fsync`` a file, or every file and directory under a directory; a failure (e.g. ENOSPC) raises."""
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_dir():
        for child in sorted(path.iterdir()):
            fsync_tree(child)
        fsync_dir(path)
    elif path.is_file():  # not a FIFO or socket: opening those could block
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """``fsync`` a directory, making the renames and new entries in it durable, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        if err.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_text_atomic(
    path: PathLike, text: str, *, inputs: Sequence[PathLike | None] = (), overwrite: bool = True
) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path, inputs=inputs, overwrite=overwrite, directory=False) as tmp:
        tmp.write_text(text)


def write_json_atomic(
    path: PathLike, obj: Any, *, inputs: Sequence[PathLike | None] = (), overwrite: bool = True
) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", inputs=inputs, overwrite=overwrite)
