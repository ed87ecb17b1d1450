"""The ``gfw`` command: every workflow step without Snakemake.

gfw qc IN.h5ad -o qc.tsv [--summary qc.json] [--plot qc.png]
gfw summarize IN.h5ad -o summary.npz [--cell-filter qc.tsv]
gfw medians IN.h5ad|SUMMARY.npz [...] [--inputs-from LIST.txt] -o gene_medians.tsv   (LIST: one path per line)
gfw vocab gene_medians.tsv -o VOCAB_DIR [--preset v1|v2]
gfw tokenize IN.h5ad OUT.parquet --token-dictionary PATH --gene-medians PATH --preset v1|v2
gfw index SHARD.parquet [...] -o DATASET_DIR/dataset.json      (the shards of one dataset + lengths in shard order)
gfw store build CORPUS... -o STORE_DIR --vocab-dir VOCAB_DIR  (the training store: what `gfw train data.store=` opens)
gfw store part SHARD.parquet -o STORE_DIR/NAME.json --vocab-dir VOCAB_DIR   (one shard's part; the workflow's jobs)
gfw store index --parts-list PARTS.txt | PART.json ... -o STORE_DIR/store.json   (the index over the parts)
gfw train [--config-name sanity] [hydra overrides ...]       (under torchrun for several processes)
gfw export CHECKPOINT OUT_DIR [--vocab-dir VOCAB_DIR]
gfw embed --model MODEL_DIR DATASET/dataset.json|CORPUS.parquet [...] -o cells.h5ad [--geneformer-emb-layer -1|0]
gfw hf-dataset DATASET/dataset.json|CORPUS.parquet [...] --split train|validation|all -o OUT_DIR
                                         (a datasets directory of one split + lengths.pkl, for Geneformer's tools)
gfw evaluate DATA.h5ad --label-key KEY --model NAME MODEL_DIR [...] [--random-weights NAME] [--pca] --scores S.tsv
                                         (cell-type scores of each model's embedding and of the baselines)
gfw plot cell-lengths|training|umap|corpus-summary|configuration ...   (figures and tables of the report)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Commands that parse their own arguments, and the module whose ``cli_main(argv)`` runs each.
OWN_PARSER_COMMANDS = {
    "train": ("geneformer_workflow.train", "pretrain (Hydra config; run under torchrun for several processes)"),
    "export": ("geneformer_workflow.train.export", "export a checkpoint to a Hugging Face BertForMaskedLM directory"),
    "embed": ("geneformer_workflow.evaluate.embed", "per-cell embeddings (AnnData obsm) from an exported model"),
    "hf-dataset": (
        "geneformer_workflow.tokenize.hf_dataset",
        "one split of a corpus as a Hugging Face datasets directory (+ lengths.pkl)",
    ),
    "evaluate": ("geneformer_workflow.evaluate.cli", "cell-type scores of model embeddings and baselines"),
    "plot": ("geneformer_workflow.report.cli", "figures and tables of the Snakemake report"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``gfw``: the data commands, and a placeholder for each command in
    :data:`OWN_PARSER_COMMANDS` (its own module parses its arguments)."""
    from geneformer_workflow.tokenize.cli import add_commands

    parser = argparse.ArgumentParser(
        prog="gfw", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    for name, (_, help_text) in OWN_PARSER_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gfw``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_PARSER_COMMANDS:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        module = importlib.import_module(OWN_PARSER_COMMANDS[argv[0]][0])
        return module.cli_main(argv[1:])
    # The data steps make no BLAS calls, but OpenBLAS's idle worker threads spin for ~0.15 s of CPU
    # after numpy is imported; with one thread there are none (set before numpy is first imported).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    from geneformer_workflow.tokenize.cli import run

    return run(args)
