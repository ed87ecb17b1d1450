"""The evaluation stage's plan from the workflow config (``evaluate:``): datasets by name and ``gfw evaluate`` options.

Used by ``workflow/rules/common.smk`` when Snakemake parses the workflow, so it imports nothing beyond the standard
library (the ``geneformer_workflow.evaluate`` package imports torch and scanpy).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

__all__ = ["checkpoint_files", "evaluation_options", "find_evaluations"]

CHECKPOINT_FILES = ("path", "token_dictionary", "gene_medians")


def find_evaluations(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``evaluate.datasets`` entries by name (``name``, else the file stem); empty when disabled.

    Raises:
        ValueError: two datasets of one name, or a dataset or checkpoint path that does not exist.
    """
    if not settings["enabled"]:
        return {}
    evaluations: dict[str, dict[str, Any]] = {}
    for entry in settings["datasets"]:
        name = entry.get("name") or Path(entry["path"]).name.removesuffix(".h5ad")
        if name in evaluations:
            msg = f"config 'evaluate.datasets': two datasets are named {name!r}; set `name:` on one of them"
            raise ValueError(msg)
        if not Path(entry["path"]).is_file():
            msg = f"config 'evaluate.datasets': {entry['path']} does not exist (relative paths start at {Path.cwd()})"
            raise ValueError(msg)
        evaluations[name] = entry
    for checkpoint in settings["checkpoints"]:
        for key in CHECKPOINT_FILES:
            if not Path(checkpoint[key]).exists():
                msg = f"config 'evaluate.checkpoints' ({checkpoint['name']}): {key} {checkpoint[key]} does not exist"
                raise ValueError(msg)
    return evaluations


def checkpoint_files(settings: dict[str, Any]) -> list[str]:
    """The listed checkpoints' directories and dictionaries (rule inputs: a change reruns the evaluation)."""
    return [checkpoint[key] for checkpoint in settings["checkpoints"] for key in CHECKPOINT_FILES]


def evaluation_options(entry: dict[str, Any], config: dict[str, Any], *, model: str, export_dir: str) -> str:
    """``gfw evaluate`` options of one dataset: columns, count source, models, scores and layer (shell-quoted)."""
    settings, embed = config["evaluate"], config["embed"]
    options: list[object] = ["--label-key", entry["label_key"], "--counts", entry.get("counts") or "X"]
    for key in ("batch_key", "gene_id_key", "gene_mapping"):
        if entry.get(key):
            options += ["--" + key.replace("_", "-"), entry[key]]
    options += ["--model", model, export_dir]
    for checkpoint in settings["checkpoints"]:
        options += ["--model", checkpoint["name"], checkpoint["path"], "--dictionaries", checkpoint["name"]]
        options += [checkpoint["token_dictionary"], checkpoint["gene_medians"]]
    if settings["random_weights"]:
        options += ["--random-weights", model]
    if settings["pca"]:
        options.append("--pca")
    options += ["--n-folds", settings["n_folds"], "--n-neighbors", settings["n_neighbors"]]
    options += ["--leiden-resolution", settings["leiden_resolution"], "--seed", settings["seed"]]
    if embed["hidden_state"] is not None:
        options += ["--hidden-state", embed["hidden_state"]]
    else:
        options += ["--geneformer-emb-layer", embed["geneformer_emb_layer"]]
    options += ["--batch-size", embed["batch_size"]]
    return shlex.join(map(str, options))
