"""Run ``gfw hf-dataset`` under another ``datasets`` (e.g. 3.x) and load directories with it; print JSON.

    PYTHONPATH=<package> python hf_dataset_check.py CORPUS OUT_DIR OTHER_DIR

Writes the train split of CORPUS to OUT_DIR with this interpreter's ``datasets``, loads it back, and tries to
load OTHER_DIR (written by another ``datasets`` version). Prints one JSON object: the ``datasets`` version, the
exit code, the rows, columns and ``input_ids`` of OUT_DIR, and what loading OTHER_DIR gave (rows or the error).
"""

from __future__ import annotations

import json
import sys

import datasets
from geneformer_workflow.tokenize.hf_dataset import cli_main


def _load(path: str) -> dict[str, object]:
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as err:  # the error is the result: an older datasets may not know a newer feature type
        return {"error": f"{type(err).__name__}: {err}"}
    return {"rows": dataset.num_rows, "columns": dataset.column_names, "input_ids": dataset["input_ids"]}


def main(corpus: str, out_dir: str, other_dir: str) -> None:
    """See the module docstring."""
    code = cli_main([corpus, "--split", "train", "-o", out_dir])
    result = {"datasets": datasets.__version__, "exit": code, "written": _load(out_dir), "other": _load(other_dir)}
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
