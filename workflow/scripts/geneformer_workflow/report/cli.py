"""``gfw plot``: the figures and tables of the Snakemake report (``snakemake --report report.html``).

    gfw plot corpus-summary --qc-summary S.json [...] --manifest M.json [...] -o corpus_summary.html
    gfw plot cell-lengths CORPUS.parquet [...] -o cell_lengths.png
    gfw plot training RUN_DIR --loss loss.png --throughput throughput.png
    gfw plot umap CELLS.h5ad -o umap.png [--qc cells.tsv ...]
    gfw plot configuration -o configuration.html --workflow-config JSON --model-dir EXPORT --run-dir RUN

Every output reads finished outputs of the workflow and is written atomically; docs/report.md says how to read
each figure. Tables are small self-contained HTML pages (the report embeds them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from geneformer_workflow.atomic import check_outputs
from geneformer_workflow.run_dir import CheckpointError

__all__ = ["build_parser", "cli_main"]


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
        from geneformer_workflow.report.corpus import write_corpus_summary

        write_corpus_summary(args.qc_summary, args.manifest, args.output)
    elif args.what == "cell-lengths":
        from geneformer_workflow.report.corpus import plot_cell_lengths

        plot_cell_lengths(args.corpus, args.output)
    elif args.what == "training":
        from geneformer_workflow.report.training import plot_training_curves

        plot_training_curves(args.run_dir, args.loss, args.throughput)
    elif args.what == "umap":
        from geneformer_workflow.report.umap import plot_umap

        plot_umap(args.h5ad, args.output, qc_tables=args.qc, seed=args.seed)
    else:
        from geneformer_workflow.report.configuration import write_configuration

        write_configuration(
            args.output,
            workflow_config=json.loads(args.workflow_config),
            model_dir=args.model_dir,
            run_dir=args.run_dir,
        )
