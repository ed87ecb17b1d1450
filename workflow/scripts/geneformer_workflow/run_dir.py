"""Files of a training run directory that other steps read: ``final.json`` and ``metrics.jsonl``.

No torch here: the report's figures (``gfw plot``, conda env ``envs/report.yaml``) read these files too.
``train/checkpoint.py`` and ``train/metrics.py`` re-export the names they own.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"  # the resolved training config of the latest start of the run (gfw train)
FINAL_FILE = "final.json"
METRICS_FILE = "metrics.jsonl"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names its path."""


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file, raising :class:`CheckpointError` naming the path when it is missing or broken."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        msg = f"cannot read {path}: {err}"
        raise CheckpointError(msg) from err


def final_checkpoint(run_dir: Path) -> Path:
    """The checkpoint that ``run_dir/final.json`` names, refusing any value but ``checkpoints/step_<n>``.

    ``final.json`` may come from another machine or user (``model.init_from``, ``gfw export``), so its
    path must not lead out of the run directory (no absolute path, no ``..``).
    """
    path = Path(run_dir) / FINAL_FILE
    value = read_json(path).get("checkpoint")
    parts = PurePosixPath(value).parts if isinstance(value, str) else ()
    if len(parts) != 2 or parts[0] != CHECKPOINTS or not STEP_DIR.match(parts[1]):
        msg = (
            f"{path}: 'checkpoint'={value!r} is not a path of the form {CHECKPOINTS}/step_<n> inside the run "
            "directory; fix or delete final.json (the newest checkpoint is then used)"
        )
        raise CheckpointError(msg)
    return Path(run_dir, *parts)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file such as ``metrics.jsonl``, one object per line.

    A last line that is not a complete JSON object is what a write cut short leaves (the job was killed or the
    disk filled up): it is dropped with a warning naming the file and the line. A broken line before the last
    one means the file was damaged otherwise, and raises.

    Raises:
        ValueError: naming the file and the line when a line other than the last is not a JSON object.
    """
    lines = [(number, line) for number, line in enumerate(Path(path).read_bytes().split(b"\n"), 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)  # bytes: a torn multi-byte character fails here too (UnicodeDecodeError)
        except ValueError as err:
            record, problem = None, f"{type(err).__name__}: {err}"
        else:
            problem = f"a JSON {type(record).__name__}, not an object"
        if isinstance(record, dict):
            records.append(record)
        elif index == len(lines) - 1:
            log.warning(
                "%s: dropping line %d, a partial record (%s): the write was cut short, e.g. the job was killed "
                "or the disk filled up; the %d records before it are kept",
                path,
                number,
                problem,
                len(records),
            )
        else:
            msg = (
                f"{path}: line {number} of {lines[-1][0]} is not a JSON record ({problem}); only a partial last "
                "line is dropped by itself. Delete or repair that line, then rerun"
            )
            raise ValueError(msg)
    return records
