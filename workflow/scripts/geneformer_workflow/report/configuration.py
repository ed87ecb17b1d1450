"""The run configuration page of the report: workflow config, the run's training config, model and run facts."""

from __future__ import annotations

import html
import json
import math
import struct
from pathlib import Path
from typing import Any

import pandas as pd

from geneformer_workflow.atomic import write_text_atomic
from geneformer_workflow.report._common import html_page, table_html
from geneformer_workflow.run_dir import CONFIG_FILE, FINAL_FILE, final_checkpoint

__all__ = ["write_configuration"]


def _safetensors_parameters(model_dir: Path) -> int | None:
    """Parameters of ``model.safetensors`` from its JSON header (no torch needed); tied weights counted once."""
    path = model_dir / "model.safetensors"
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))  # little-endian u64 header length, then the JSON header
        header = json.loads(fh.read(size))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


MODEL_FACTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
MODEL_FACTS += ("max_position_embeddings", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob")
RUN_FACTS = ("step", "epoch", "tokens_seen", "cells_seen", "train_cells", "global_batch_size", "micro_batch_size")
RUN_FACTS += ("grad_accum_steps", "world_size", "backend", "seed")


def write_configuration(
    out: str | Path, *, workflow_config: dict[str, Any], model_dir: str | Path, run_dir: str | Path
) -> None:
    """An HTML page with the run's configuration: workflow config, training config, model and run facts.

    The training config is the one the run used, as ``gfw train`` wrote it (``RUN_DIR/config.yaml``, resolved);
    the model and run tables come from the exported model and the final checkpoint.
    """
    import yaml

    model_dir, run_dir = Path(model_dir), Path(run_dir)
    sections = {
        "Workflow configuration (config.yaml after defaults and --config)": _pre(
            yaml.safe_dump(workflow_config, sort_keys=False)
        )
    }
    run_config = run_dir / CONFIG_FILE
    if not run_config.is_file():
        msg = f"{run_config} not found: the run directory of a `gfw train` run holds the config it used"
        raise ValueError(msg)
    sections[f"Training configuration (as the run used it: {run_config})"] = _pre(run_config.read_text())
    hf = _read_json(model_dir / "config.json")
    model_facts = {k: hf[k] for k in MODEL_FACTS if k in hf}
    model_facts["parameters"] = _safetensors_parameters(model_dir)
    sections[f"Exported model ({model_dir})"] = table_html(_facts(model_facts), float_format=".6g")
    final = _read_json(run_dir / FINAL_FILE)
    meta = _read_json(final_checkpoint(run_dir) / "checkpoint.json") if final else {}
    run_facts = {**{k: meta[k] for k in RUN_FACTS if k in meta}, **{k: v for k, v in final.items()}}
    sections[f"Pretraining run ({run_dir})"] = table_html(_facts(run_facts), float_format=".6g")
    body = "".join(f"<h3>{html.escape(title)}</h3>{content}" for title, content in sections.items())
    write_text_atomic(out, html_page("Run configuration", body))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _facts(facts: dict[str, Any]) -> pd.DataFrame:
    return pd.Series({k: v for k, v in facts.items() if v is not None}, name="value", dtype=object).to_frame()


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"
