"""``gfw plot``: the figures and tables of the Snakemake report (``snakemake --report report.html``).

    gfw plot corpus-summary --qc-summary S.json [...] --manifest M.json [...] -o corpus_summary.html
    gfw plot cell-lengths CORPUS.parquet [...] -o cell_lengths.png
    gfw plot training RUN_DIR --loss loss.png --throughput throughput.png
    gfw plot umap CELLS.h5ad -o umap.png [--qc cells.tsv ...]
    gfw plot configuration -o configuration.html --workflow-config JSON --model-dir EXPORT --run-dir RUN [...]

Every function reads finished outputs of the workflow and writes one file atomically; docs/report.md says how
to read each figure. Tables are small self-contained HTML pages (the report embeds them).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._atomic import atomic_files, atomic_path, check_outputs, write_text_atomic
from ._run_dir import FINAL_FILE, METRICS_FILE, CheckpointError, final_checkpoint, read_jsonl

__all__ = [
    "cli_main",
    "plot_cell_lengths",
    "plot_training_curves",
    "plot_umap",
    "write_configuration",
    "write_corpus_summary",
]

log = logging.getLogger(__name__)

_CSS = (
    "body{font-family:sans-serif;font-size:14px;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
    "pre{background:#f7f7f7;border:1px solid #ddd;padding:8px;font-size:12px}"
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: str | Path, **savefig: Any) -> None:
    with atomic_path(out) as tmp:
        _save_to(fig, tmp, **savefig)


def _save_to(fig: Any, out: Path, **savefig: Any) -> None:
    """Write and close ``fig``; the format follows ``out``'s suffix."""
    fig.savefig(out, format=out.suffix.lstrip(".") or "png", dpi=100, **savefig)
    _pyplot().close(fig)


def _html_page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n"
    )


def _manifest_of(parquet: Path) -> dict[str, Any]:
    """The ``X.manifest.json`` beside ``X.parquet`` (written by ``gfw tokenize``), or {}."""
    path = Path(f"{parquet.with_suffix('')}.manifest.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def _dataset_name(source: str) -> str:
    return Path(source).name.removesuffix(".h5ad")


def write_corpus_summary(qc_summaries: list[Path], manifests: list[Path], out: str | Path) -> pd.DataFrame:
    """One row per input file: QC (kept / dropped), genes mapped, corpus cells and tokens; plus the vocabulary.

    Args:
        qc_summaries: ``summary.json`` files of ``gfw qc``.
        manifests: ``*.manifest.json`` of every corpus shard (``gfw tokenize``); shards of a file are summed.
        out: HTML page to write.

    Returns:
        The per-file table.
    """
    qc = {_dataset_name(s["source"]): s for s in (json.loads(Path(p).read_text()) for p in qc_summaries)}
    shards = pd.DataFrame([json.loads(Path(p).read_text()) for p in manifests])
    if shards.empty:
        msg = f"no corpus manifests given to write {out}; pass the tokenize step's *.manifest.json files"
        raise ValueError(msg)
    shards["dataset"] = shards["source"].map(_dataset_name)
    rows = []
    for name, part in shards.groupby("dataset", sort=True):
        first, qc_row = part.iloc[0], qc.get(name, {})
        rows.append(
            {
                "dataset": name,
                "cells in file": int(qc_row.get("n_cells", part["n_cells_input"].sum())),
                "dropped by QC": int(qc_row.get("n_cells_dropped", part["n_cells_filtered"].sum())),
                "dropped empty": int(part["n_cells_empty"].sum()),
                "cells in corpus": int(part["n_cells"].sum()),
                "validation cells": int(part["n_validation"].sum()),
                "median counts": qc_row.get("median_total_counts", math.nan),
                "median genes": qc_row.get("median_genes", math.nan),
                "median % mito": qc_row.get("median_pct_mito", math.nan),
                "genes in file": int(first["genes_in_file"]),
                "genes mapped to vocabulary": int(first["genes_matched"]),
                "% genes mapped": 100.0 * first["genes_matched"] / max(first["genes_in_file"], 1),
                "% counts on vocabulary": 100.0
                * part["counts_in_vocabulary"].sum()
                / max(part["counts_total"].sum(), 1),
                "tokens": int(part["n_tokens"].sum()),
                "mean tokens per cell": part["n_tokens"].sum() / max(part["n_cells"].sum(), 1),
            }
        )
    table = pd.DataFrame(rows).set_index("dataset")
    first = shards.iloc[0]
    vocab = {
        "vocabulary size (tokens)": f"{int(first['vocab_size']):,}",
        "preset": f"{first['preset']} ({int(first['max_length']):,} tokens per cell at most)",
        "special tokens": "<pad>, <mask>, <cls>, <eos>" if first["special_tokens"] else "<pad>, <mask>",
        "token dictionary sha256": str(first["token_dictionary_sha256"]),
    }
    thresholds = next(iter(qc.values()), {}).get("thresholds", {})
    body = (
        _table_html(table.rename_axis(None).astype(object).T)  # one column per file: reads down
        + "<h3>Vocabulary</h3>"
        + _table_html(pd.Series(vocab, name="value").to_frame())
        + "<h3>QC thresholds (null = not applied)</h3>"
        + _table_html(
            pd.Series({k: "null" if v is None else v for k, v in thresholds.items()}, name="value").to_frame()
        )
    )
    write_text_atomic(out, _html_page("Corpus summary", body))
    return table


def _table_html(frame: pd.DataFrame, *, float_format: str = ",.1f") -> str:
    """``frame`` as an HTML table; integers with thousands separators, other numbers as ``float_format``."""

    def cell(value: Any) -> str:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            return str(value)
        if isinstance(value, (int, np.integer)):
            return f"{value:,}"
        return "–" if math.isnan(value) else format(value, float_format)

    return frame.astype(object).map(cell).to_html()


def plot_cell_lengths(corpus: list[Path], out: str | Path) -> None:
    """Histogram of tokens per cell, one step curve per input file, with the preset's maximum as a dashed line."""
    import pyarrow.parquet as pq

    lengths: dict[str, list[np.ndarray]] = {}
    max_length = None
    for path in map(Path, corpus):
        manifest = _manifest_of(path)
        name = _dataset_name(manifest["source"]) if "source" in manifest else path.parent.name
        max_length = manifest.get("max_length", max_length)
        lengths.setdefault(name, []).append(pq.read_table(path, columns=["length"]).column("length").to_numpy())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    every = np.concatenate([a for parts in lengths.values() for a in parts]) if lengths else np.zeros(0)
    bins = np.linspace(0, max(int(every.max(initial=1)), max_length or 1), 60)
    for name, parts in lengths.items():
        ax.hist(np.concatenate(parts), bins=bins, histtype="step", linewidth=1.5, label=name)
    if max_length:
        ax.axvline(max_length, color="tab:red", linestyle="--", label=f"maximum ({max_length:,})")
    ax.set(xlabel="tokens per cell (genes ranked; special tokens included)", ylabel="cells")
    at_max = float(np.mean(every >= max_length)) * 100 if max_length and every.size else 0.0
    median = float(np.median(every)) if every.size else math.nan
    ax.set_title(f"{every.size:,} cells: median {median:,.0f} tokens, {at_max:.1f} % at the maximum (truncated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """``metrics.jsonl`` as one row per step (the last value logged wins), sorted by step.

    A partial last line (a killed run) is dropped with a warning; a broken line before it raises ``ValueError``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        msg = f"{path} not found: plot the training curves of a run directory of `gfw train`"
        raise ValueError(msg)
    frame = pd.DataFrame(read_jsonl(path))
    if frame.empty:
        return pd.DataFrame({"step": []})
    return frame.groupby("step", sort=True).last().reset_index()


def plot_training_curves(run_dir: str | Path, loss_out: str | Path, throughput_out: str | Path) -> None:
    """Loss (train and validation) and learning rate; throughput and step time, against the optimizer step.

    The two figures appear together or not at all (``_atomic.atomic_files``).
    """
    with atomic_files([loss_out, throughput_out], inputs=[run_dir]) as (tmp_loss, tmp_throughput):
        _plot_training_curves(run_dir, tmp_loss, tmp_throughput)


def _plot_training_curves(run_dir: str | Path, loss_out: Path, throughput_out: Path) -> None:
    metrics = read_metrics(run_dir)
    vocab_size = _vocab_size(Path(run_dir))
    plt = _pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4))
    _line(ax_loss, metrics, "train/loss", "training loss (masked tokens)", "tab:blue")
    _line(ax_loss, metrics, "validation/loss", "validation loss (fixed masks)", "tab:orange", marker="o")
    if vocab_size:
        ax_loss.axhline(math.log(vocab_size), color="gray", linestyle=":", label=f"uniform guess, ln {vocab_size:,}")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats per masked token)", title="masked-LM loss")
    ax_loss.legend(fontsize=8)
    _line(ax_lr, metrics, "train/learning_rate", "learning rate", "tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate schedule")
    fig.tight_layout()
    _save_to(fig, loss_out)

    fig, (ax_tps, ax_time) = plt.subplots(1, 2, figsize=(12, 4))
    _line(ax_tps, metrics, "train/unpadded_tokens_per_second", "real tokens / s (all ranks)", "tab:blue")
    _line(ax_tps, metrics, "train/tokens_per_second", "token slots incl. padding / s", "tab:gray", linestyle="--")
    ax_tps.set(xlabel="step", ylabel="tokens per second", title=_throughput_title(metrics))
    ax_tps.set_ylim(bottom=0)
    ax_tps.legend(fontsize=8)
    _line(ax_time, metrics, "train/step_time", "seconds per step", "tab:purple")
    ax_time.set(xlabel="step", ylabel="seconds per optimizer step", title="step time")
    ax_time.set_ylim(bottom=0)
    fig.tight_layout()
    _save_to(fig, throughput_out)


def _line(ax: Any, metrics: pd.DataFrame, key: str, label: str, color: str, **style: Any) -> None:
    if key in metrics:
        rows = metrics[["step", key]].dropna()
        ax.plot(rows["step"], rows[key], label=label, color=color, **style)


def _throughput_title(metrics: pd.DataFrame) -> str:
    key = "train/unpadded_tokens_per_second"
    values = metrics[key].dropna() if key in metrics else pd.Series(dtype=float)
    steady = values.iloc[1:] if len(values) > 1 else values  # the first interval includes start-up
    return f"throughput: median {steady.median():,.0f} real tokens/s" if len(steady) else "throughput"


def _vocab_size(run_dir: Path) -> int | None:
    if not (run_dir / FINAL_FILE).is_file():
        return None
    config = final_checkpoint(run_dir) / "model_config.json"  # refuses a path that leaves the run directory
    return int(json.loads(config.read_text())["vocab_size"]) if config.is_file() else None


def plot_umap(h5ad: str | Path, out: str | Path, *, qc_tables: Sequence[Path] = (), seed: int = 0) -> None:
    """UMAP (scanpy) of ``obsm["X_geneformer_mean"]``, coloured by Leiden clusters (when igraph is installed),
    total counts (from the QC tables) and tokens per cell."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(h5ad)
    colors = _umap_colors(adata, qc_tables)
    plt = _pyplot()
    if adata.n_obs < 5:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.text(0.5, 0.5, f"{adata.n_obs} cells: too few for a UMAP", ha="center", va="center")
        ax.set_axis_off()
        _save(fig, out)
        return
    sc.pp.neighbors(adata, n_neighbors=min(15, adata.n_obs - 1), use_rep="X_geneformer_mean", random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    if _has_igraph():
        sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
        colors.insert(0, "leiden")
    layer = adata.uns.get("geneformer_embedding", {}).get("layer", "?")
    fig = sc.pl.umap(
        adata, color=colors, show=False, return_fig=True, ncols=2, wspace=0.35, size=max(20, 12000 / adata.n_obs)
    )
    fig.suptitle(f"{adata.n_obs:,} cells, mean embedding of hidden_states[{layer}]", y=1.02)
    _save(fig, out, bbox_inches="tight")


def _umap_colors(adata: Any, qc_tables: Sequence[Path]) -> list[str]:
    colors = []
    if qc_tables:
        qc = pd.concat([pd.read_csv(p, sep="\t", index_col=0) for p in qc_tables])
        qc = qc[~qc.index.duplicated()]
        adata.obs["log10 total counts"] = np.log10(qc["total_counts"].reindex(adata.obs_names).to_numpy() + 1)
        colors.append("log10 total counts")
    if "length" in adata.obs:
        adata.obs["tokens per cell"] = adata.obs["length"].astype(float)
        colors.append("tokens per cell")
    if "split" in adata.obs:
        colors.append("split")
    return colors


def _has_igraph() -> bool:
    try:
        import igraph  # noqa: F401 (scanpy's Leiden flavor "igraph" needs only this package)
    except ImportError:
        return False
    return True


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
    out: str | Path,
    *,
    workflow_config: dict[str, Any],
    model_dir: str | Path,
    run_dir: str | Path,
    train_config_dir: str | Path | None = None,
    model_name: str | None = None,
    train_overrides: Sequence[str] = (),
) -> None:
    """An HTML page with the run's configuration: workflow config, training config, model and run facts.

    The training config is composed again from ``train_config_dir`` (as ``gfw train`` does), so it shows the
    config files as they are now; the model and run tables come from the exported model and the final checkpoint.
    """
    import yaml

    model_dir, run_dir = Path(model_dir), Path(run_dir)
    sections = {
        "Workflow configuration (config.yaml after defaults and --config)": _pre(
            yaml.safe_dump(workflow_config, sort_keys=False)
        )
    }
    if train_config_dir and model_name:
        title = f"Training configuration (config/train/{model_name}.yaml + overrides)"
        sections[title] = _pre(_compose(Path(train_config_dir), model_name, list(train_overrides)))
    hf = _read_json(model_dir / "config.json")
    model_facts = {k: hf[k] for k in MODEL_FACTS if k in hf}
    model_facts["parameters"] = _safetensors_parameters(model_dir)
    sections[f"Exported model ({model_dir})"] = _table_html(_facts(model_facts), float_format=".6g")
    final = _read_json(run_dir / FINAL_FILE)
    meta = _read_json(final_checkpoint(run_dir) / "checkpoint.json") if final else {}
    run_facts = {**{k: meta[k] for k in RUN_FACTS if k in meta}, **{k: v for k, v in final.items()}}
    sections[f"Pretraining run ({run_dir})"] = _table_html(_facts(run_facts), float_format=".6g")
    body = "".join(f"<h3>{html.escape(title)}</h3>{content}" for title, content in sections.items())
    write_text_atomic(out, _html_page("Run configuration", body))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _facts(facts: dict[str, Any]) -> pd.DataFrame:
    return pd.Series({k: v for k, v in facts.items() if v is not None}, name="value", dtype=object).to_frame()


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _compose(config_dir: Path, name: str, overrides: list[str]) -> str:
    """The training config as ``gfw train`` composes it (Hydra compose API), as YAML."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
        cfg = compose(config_name=name, overrides=overrides)
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # a mandatory key (???) left open: show the config unresolved rather than nothing
        return OmegaConf.to_yaml(cfg)


def build_parser() -> argparse.ArgumentParser:
    """``gfw plot`` arguments: one subcommand per figure or table."""
    # @FILE reads more arguments from FILE, one per line: the workflow pipes lists of thousands of paths through
    # @/dev/stdin, since one program's arguments are capped (Linux: 128 KiB each, ~2 MiB in all).
    parser = argparse.ArgumentParser(
        prog="gfw plot", description="Figures and tables of the Snakemake report.", fromfile_prefix_chars="@"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
    sub = _SubcommandsWithOptions(parser.add_subparsers(dest="what", required=True), common)
    p = sub.add_parser("corpus-summary", help="per-file QC, mapping and corpus table (HTML)")
    p.add_argument("--qc-summary", type=Path, nargs="*", default=[], help="summary.json files of `gfw qc`")
    p.add_argument("--manifest", type=Path, nargs="+", required=True, help="*.manifest.json of the corpus shards")
    p.add_argument("-o", "--output", type=Path, required=True)
    p = sub.add_parser("cell-lengths", help="histogram of tokens per cell")
    p.add_argument("corpus", type=Path, nargs="+", help="corpus parquet files")
    p.add_argument("-o", "--output", type=Path, required=True)
    p = sub.add_parser("training", help="loss and throughput curves from RUN_DIR/metrics.jsonl")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--loss", type=Path, required=True, help="loss figure to write")
    p.add_argument("--throughput", type=Path, required=True, help="throughput figure to write")
    p = sub.add_parser("umap", help="UMAP of the mean cell embeddings of `gfw embed`")
    p.add_argument("h5ad", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--qc", type=Path, nargs="*", default=[], help="QC tables (cells.tsv) for total counts")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("configuration", help="the run's configuration (HTML)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--workflow-config", default="{}", help="the workflow config as JSON")
    p.add_argument("--model-dir", type=Path, required=True, help="exported model directory")
    p.add_argument("--run-dir", type=Path, required=True, help="pretraining run directory")
    p.add_argument("--train-config-dir", type=Path, default=None, help="Hydra config directory (config/train)")
    p.add_argument("--model", default=None, help="training config name, e.g. sanity")
    p.add_argument("--train-overrides", default="[]", help="Hydra overrides as a JSON list")
    return parser


class _SubcommandsWithOptions:
    """``add_parser`` that gives every subcommand the ``common`` options."""

    def __init__(self, sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
        self.sub, self.common = sub, common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, parents=[self.common], **kwargs)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output that is an input, a directory or (without ``--overwrite``) an existing file."""
    outputs = [args.loss, args.throughput] if args.what == "training" else [args.output]
    inputs = [*getattr(args, "qc_summary", []), *getattr(args, "manifest", []), *getattr(args, "corpus", [])]
    inputs += [getattr(args, "h5ad", None), *getattr(args, "qc", []), getattr(args, "model_dir", None)]
    inputs += [getattr(args, "run_dir", None)]
    check_outputs(outputs, inputs=inputs, overwrite=args.overwrite)


def cli_main(argv: list[str]) -> int:
    """Entry point of ``gfw plot``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        _check_outputs(args)
        _run(args)
    except (ValueError, OSError, CheckpointError) as err:
        print(f"gfw plot {args.what}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.what == "corpus-summary":
        write_corpus_summary(args.qc_summary, args.manifest, args.output)
    elif args.what == "cell-lengths":
        plot_cell_lengths(args.corpus, args.output)
    elif args.what == "training":
        plot_training_curves(args.run_dir, args.loss, args.throughput)
    elif args.what == "umap":
        plot_umap(args.h5ad, args.output, qc_tables=args.qc, seed=args.seed)
    else:
        write_configuration(
            args.output,
            workflow_config=json.loads(args.workflow_config),
            model_dir=args.model_dir,
            run_dir=args.run_dir,
            train_config_dir=args.train_config_dir,
            model_name=args.model,
            train_overrides=json.loads(args.train_overrides),
        )
