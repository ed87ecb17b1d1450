"""The data commands of ``gfw`` (no torch): qc, summarize, medians, vocab, tokenize, index and store.

:func:`add_commands` adds their subparsers to ``gfw``'s parser; :func:`run` checks the outputs before any work
(an input, a directory or, without ``--overwrite``, an existing file is never replaced), runs one command and turns
bad input into one line ``gfw COMMAND: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from geneformer_workflow.presets import PRESETS
from geneformer_workflow.tokenize._parquet import DEFAULT_ENCODING, ENCODINGS

log = logging.getLogger("geneformer_workflow")


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--counts", default="X", help="where the raw counts are: X, raw or layers/<name> (default X)")
    parser.add_argument("--gene-id-key", default=None, help="var column with the gene ids (default: the var index)")
    parser.add_argument(
        "--gene-mapping",
        type=Path,
        default=None,
        help="gene id -> Ensembl id mapping: JSON, two-column TSV/CSV, Geneformer's ensembl_mapping_dict pickle, "
        "or GRCh38 for the shipped human symbol table (Ensembl 93)",
    )
    parser.add_argument("--chunk-size", type=int, default=2048, help="cells read per chunk (bounds memory)")


def _add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (default: refuse); an input or a directory of other files is never replaced",
    )


def _optional(kind: type) -> object:
    """argparse type: a number, or ``none`` for "not applied"."""

    def parse(text: str) -> float | int | None:
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _row_range(text: str) -> tuple[int, int]:
    """argparse type for ``START:STOP``."""
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit():
        msg = f"expected START:STOP, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(start), int(stop)


def _fraction(text: str) -> float:
    """argparse type for a held-out fraction: a number in [0, 1) (1 would leave no cell to train on)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:  # NaN fails too
        msg = f"expected a fraction of the cells in [0, 1), e.g. 0.05 (1 would leave none to train on), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_qc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qc", help="per-cell QC metrics and filter_pass (scanpy)")
    p.add_argument("h5ad", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="per-cell QC table (TSV)")
    p.add_argument("--summary", type=Path, help="JSON summary to write")
    p.add_argument("--plot", type=Path, help="QC figure to write (.png/.svg)")
    p.add_argument(
        "--expression-summary",
        type=Path,
        help="also write the file's expression summary for gene medians (.npz) over the cells that pass, in the "
        "same pass: the file `gfw summarize --cell-filter` on the QC table would write",
    )
    p.add_argument(
        "--min-counts", type=_optional(float), default=None, help="minimum total counts per cell (default: none)"
    )
    p.add_argument(
        "--max-counts", type=_optional(float), default=None, help="maximum total counts per cell (default: none)"
    )
    p.add_argument(
        "--min-genes",
        type=_optional(int),
        default=200,
        help="minimum detected genes per cell (default 200; none disables)",
    )
    p.add_argument(
        "--max-genes", type=_optional(int), default=None, help="maximum detected genes per cell (default: none)"
    )
    p.add_argument(
        "--max-pct-mito",
        type=_optional(float),
        default=20.0,
        help="maximum %% mitochondrial counts (default 20; none disables)",
    )
    _add_input_options(p)
    _add_overwrite_option(p)


def _add_summarize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summarize", help="per-file mergeable summary for gene medians")
    p.add_argument("h5ad", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="summary (.npz)")
    p.add_argument("--cell-filter", type=Path, help="QC table from `gfw qc` (cells with filter_pass=0 are skipped)")
    _add_input_options(p)
    _add_overwrite_option(p)


def _add_medians(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("medians", help="merged gene median table from h5ad files or summaries")
    p.add_argument("inputs", type=Path, nargs="*", help=".h5ad files and/or .npz summaries")
    p.add_argument(
        "--inputs-from",
        type=Path,
        default=None,
        help="read more inputs from this file, one path per line (- = standard input): for lists too long "
        "for a command line",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="gene_medians.tsv")
    _add_input_options(p)
    _add_overwrite_option(p)


def _add_vocab(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vocab", help="token dictionary + Hugging Face tokenizer dir")
    p.add_argument("gene_medians", type=Path, help="gene_medians.tsv (or Geneformer's median pickle)")
    p.add_argument("-o", "--output", type=Path, required=True, help="vocabulary directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="v1")
    p.add_argument(
        "--token-dictionary",
        type=Path,
        default=None,
        help="use this existing dictionary (ours or Geneformer's pickle) instead of building one from the medians",
    )
    _add_overwrite_option(p)


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="rank-value tokenize an h5ad into a parquet corpus")
    p.add_argument("h5ad", type=Path)
    p.add_argument("output", type=Path, help="corpus .parquet (lengths and manifest are written beside it)")
    p.add_argument("--token-dictionary", type=Path, required=True, help="vocab dir, token_dictionary.json or .pkl")
    p.add_argument("--gene-medians", type=Path, required=True, help="gene_medians.tsv or Geneformer's pickle")
    p.add_argument("--preset", choices=sorted(PRESETS), default="v1")
    p.add_argument("--cell-filter", type=Path, help="QC table from `gfw qc`")
    p.add_argument("--obs-columns", default="", help="comma-separated obs columns to keep in the corpus")
    p.add_argument(
        "--validation-fraction",
        type=_fraction,
        default=0.05,
        help="fraction of the cells held out for validation, in [0, 1) (by id hash; default 0.05)",
    )
    p.add_argument(
        "--rows", type=_row_range, default=None, help="tokenize only rows START:STOP (0-based, STOP excluded): a shard"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads (default 2: reading and parquet encoding overlap ranking; more add ranking threads, "
        "useful where sorting is slow, e.g. without AVX-512); the output does not depend on it",
    )
    p.add_argument(
        "--parquet-encoding",
        choices=ENCODINGS,
        default=DEFAULT_ENCODING,
        help="encoding of the token lists: dictionary (default; any pyarrow >= 15 reads it) or byte_stream_split "
        "(~10%% less tokenize CPU, 3%% smaller; needs pyarrow >= 16 to read)",
    )
    _add_input_options(p)
    _add_overwrite_option(p)


def _add_index(sub: argparse._SubParsersAction) -> None:
    # @FILE reads more arguments from FILE, one per line (the workflow pipes the shards through @/dev/stdin).
    p = sub.add_parser(
        "index", help="index of a dataset's shards + its lengths files in shard order", fromfile_prefix_chars="@"
    )
    p.add_argument(
        "shards", type=Path, nargs="+", help="the dataset's corpus shards (.parquet), in order; @FILE: one per line"
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="dataset.json to write (X.lengths.npy and X.lengths.pkl are written beside X.json)",
    )
    _add_overwrite_option(p)


def _add_store(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="the training store: the corpus in the layout training reads (uint16 tokens)")
    store = p.add_subparsers(dest="store_command", required=True)

    def add_common(q: argparse.ArgumentParser, splits: bool) -> None:
        if splits:
            q.add_argument("--vocab-dir", type=Path, required=True, help="vocabulary the corpus was tokenized with")
            q.add_argument("--train-split", default="train", help="`split` value of training cells (default train)")
            q.add_argument("--validation-split", default="validation", help="`split` value of validation cells")
        _add_overwrite_option(q)

    q = store.add_parser("build", help="a whole store from a corpus: one part per shard, then the index")
    q.add_argument("corpus", nargs="+", help="parquet files, dataset.json indexes, directories or globs, in order")
    q.add_argument("-o", "--output", type=Path, required=True, help="store directory to write (store.json + parts)")
    add_common(q, splits=True)
    q = store.add_parser("part", help="one corpus shard's store part (X.tokens.npy, X.offsets.npy, X.json)")
    q.add_argument("shard", type=Path, help="corpus shard (.parquet)")
    q.add_argument("-o", "--output", type=Path, required=True, help="the part's X.json (its data files go beside it)")
    add_common(q, splits=True)
    q = store.add_parser("index", help="the store's index over its parts, in corpus order")
    q.add_argument("parts", type=Path, nargs="*", help="part manifests (X.json), in corpus order")
    q.add_argument("--parts-list", type=Path, help="a text file listing the part manifests, one per line")
    q.add_argument("-o", "--output", type=Path, required=True, help="store.json to write")
    add_common(q, splits=False)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the data commands to ``gfw``'s subparsers."""
    for add in (_add_qc, _add_summarize, _add_medians, _add_vocab, _add_tokenize, _add_index, _add_store):
        add(sub)


def run(args: argparse.Namespace) -> int:
    """Run one parsed data command; 2 with a one-line message on bad input, a full disk or an unreadable file."""
    from geneformer_workflow.tokenize.h5ad import InputError

    try:
        _run(args)
    except (InputError, ValueError) as err:
        print(f"gfw {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable input, disk full, ...
        from geneformer_workflow.atomic import describe_os_error

        print(f"gfw {args.command}: error: {describe_os_error(err, args.output)}", file=sys.stderr)
        return 2
    return 0


def _mapping(args: argparse.Namespace) -> dict[str, str] | None:
    from geneformer_workflow.tokenize.genes import load_gene_mapping

    return load_gene_mapping(args.gene_mapping) if args.gene_mapping else None


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that would destroy an input, a directory or an existing file, before any work."""
    from geneformer_workflow.atomic import check_outputs

    inputs = [getattr(args, "h5ad", None), getattr(args, "gene_mapping", None), getattr(args, "cell_filter", None)]
    inputs += [getattr(args, "token_dictionary", None), getattr(args, "gene_medians", None)]
    inputs.append(getattr(args, "vocab_dir", None))  # gfw store: its files must not become outputs
    inputs += list(getattr(args, "inputs", None) or [])
    if getattr(args, "inputs_from", None) is not None and str(args.inputs_from) != "-":
        inputs.append(args.inputs_from)  # gfw medians' list file: -o must not replace it
    if args.command == "qc":
        outputs = [args.output, args.summary, args.plot, args.expression_summary]
    elif args.command == "tokenize":
        from geneformer_workflow.tokenize.corpus_index import CorpusPaths

        outputs = CorpusPaths.beside(args.output).all()
    elif args.command == "index":
        from geneformer_workflow.tokenize.corpus_index import index_paths

        outputs, inputs = index_paths(args.output), inputs + list(args.shards)
    elif args.command == "store":
        from geneformer_workflow.tokenize.store import part_paths

        outputs = part_paths(args.output) if args.store_command == "part" else [args.output]
        inputs += [getattr(args, "shard", None), *getattr(args, "parts", [])]
    else:
        outputs = [args.output]
    outputs = [p for p in outputs if p is not None]
    if len({Path(p).resolve() for p in outputs}) != len(outputs):
        msg = f"the output paths {[str(p) for p in outputs]} must differ from each other"
        raise ValueError(msg)
    directory = args.command == "vocab" or (args.command == "store" and args.store_command == "build")
    check_outputs(outputs, inputs=inputs, overwrite=args.overwrite, directory=directory)


def _read_path_list(path: Path) -> list[Path]:
    """Paths listed one per line in ``path`` (``-``: standard input); blank lines are skipped."""
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    return [Path(line) for line in text.splitlines() if line.strip()]


def _medians_inputs(args: argparse.Namespace) -> list[Path]:
    """The inputs of ``gfw medians``: those on the command line, then those of ``--inputs-from``."""
    inputs = list(args.inputs) + (_read_path_list(args.inputs_from) if args.inputs_from else [])
    if not inputs:
        source = f"{args.inputs_from} lists no path" if args.inputs_from else "no input given"
        msg = f"{source}: give .h5ad files or .npz summaries (or --inputs-from FILE with one path per line)"
        raise ValueError(msg)
    return inputs


def _run(args: argparse.Namespace) -> None:
    if args.command == "medians":
        args.inputs = _medians_inputs(args)
    _check_outputs(args)
    if args.command == "qc":
        from geneformer_workflow.tokenize.qc import QCThresholds, run_qc

        thresholds = QCThresholds(args.min_counts, args.max_counts, args.min_genes, args.max_genes, args.max_pct_mito)
        run_qc(
            args.h5ad,
            args.output,
            thresholds=thresholds,
            counts=args.counts,
            gene_id_key=args.gene_id_key,
            summary_json=args.summary,
            plot=args.plot,
            expression_summary=args.expression_summary,
            gene_mapping=_mapping(args) if args.expression_summary else None,  # only the summary maps gene ids
            chunk_size=args.chunk_size,
            overwrite=args.overwrite,
        )
    elif args.command == "summarize":
        from geneformer_workflow.tokenize.medians import summarize_h5ad

        summarize_h5ad(
            args.h5ad,
            counts=args.counts,
            gene_id_key=args.gene_id_key,
            gene_mapping=_mapping(args),
            cell_filter=args.cell_filter,
            chunk_size=args.chunk_size,
        ).save(args.output)
    elif args.command == "medians":
        from geneformer_workflow.tokenize.medians import (
            ExpressionSummary,
            merge_summaries,
            summarize_h5ad,
            write_medians_tsv,
        )

        summaries = (  # a generator: one summary in memory at a time (merge_summaries streams)
            ExpressionSummary.load(p)
            if p.suffix == ".npz"
            else summarize_h5ad(
                p,
                counts=args.counts,
                gene_id_key=args.gene_id_key,
                gene_mapping=_mapping(args),
                chunk_size=args.chunk_size,
            )
            for p in args.inputs
        )
        table = merge_summaries(summaries).medians()
        write_medians_tsv(table, args.output)
        log.info("wrote %d gene medians to %s", len(table), args.output)
    elif args.command == "vocab":
        _run_vocab(args)
    elif args.command == "tokenize":
        _run_tokenize(args)
    elif args.command == "store":
        _run_store(args)
    elif args.command == "index":
        from geneformer_workflow.tokenize.corpus_index import write_dataset_index

        index = write_dataset_index(list(args.shards), args.output, overwrite=args.overwrite)
        log.info(
            "%s: %d shards, %d cells, %d tokens",
            args.output,
            len(index.shards),
            index.info["n_cells"],
            index.info["n_tokens"],
        )


def _run_store(args: argparse.Namespace) -> None:
    from geneformer_workflow.tokenize.store import SplitValues, build_store, read_parts_list, write_index, write_part

    if args.store_command == "index":
        parts = list(args.parts) + (read_parts_list(args.parts_list) if args.parts_list else [])
        info = write_index(parts, args.output, overwrite=args.overwrite)
    else:
        from geneformer_workflow.tokenize.vocab import load_token_dictionary, token_dictionary_sha256

        tokens = load_token_dictionary(args.vocab_dir)
        vocab = {"vocab_size": max(tokens.values()) + 1, "token_dictionary_sha256": token_dictionary_sha256(tokens)}
        splits = SplitValues(train=args.train_split, validation=args.validation_split)
        if args.store_command == "part":
            info = write_part(args.shard, args.output, splits=splits, overwrite=args.overwrite, **vocab)
        else:
            from geneformer_workflow.atomic import atomic_path
            from geneformer_workflow.tokenize.corpus_index import resolve_corpus_inputs

            files = resolve_corpus_inputs(args.corpus, unindexed=True)
            owned = lambda name: name == "store.json" or name.startswith("part-")  # noqa: E731
            with atomic_path(args.output, inputs=files, overwrite=args.overwrite, directory=True, owned=owned) as tmp:
                tmp.mkdir()
                info = build_store(files, tmp, splits=splits, **vocab)
    log.info(
        "%s: %d train cells (%d tokens), %d validation cells (%d tokens)",
        args.output,
        info["train"]["cells"],
        info["train"]["tokens"],
        info["validation"]["cells"],
        info["validation"]["tokens"],
    )


def _run_vocab(args: argparse.Namespace) -> None:
    from geneformer_workflow.presets import get_preset
    from geneformer_workflow.tokenize.median_table import read_gene_medians
    from geneformer_workflow.tokenize.vocab import build_token_dictionary, load_token_dictionary, write_vocab_dir

    preset = get_preset(args.preset)
    medians = read_gene_medians(args.gene_medians)
    if args.token_dictionary:
        tokens = load_token_dictionary(args.token_dictionary)
    else:
        tokens = build_token_dictionary(medians, preset)
    # The medians travel with the vocabulary (gene_median_dictionary.pkl, for Geneformer's tools).
    write_vocab_dir(tokens, args.output, max_length=preset.max_length, gene_medians=medians)
    log.info("wrote a vocabulary of %d tokens (preset %s) to %s", len(tokens), preset.name, args.output)


def _run_tokenize(args: argparse.Namespace) -> None:
    from geneformer_workflow.presets import get_preset
    from geneformer_workflow.tokenize.median_table import read_gene_medians
    from geneformer_workflow.tokenize.tokenizer import tokenize_h5ad
    from geneformer_workflow.tokenize.vocab import load_token_dictionary

    stats = tokenize_h5ad(
        args.h5ad,
        args.output,
        token_dictionary=load_token_dictionary(args.token_dictionary),
        gene_medians=read_gene_medians(args.gene_medians),
        preset=get_preset(args.preset),
        counts=args.counts,
        gene_id_key=args.gene_id_key,
        gene_mapping=_mapping(args),
        cell_filter=args.cell_filter,
        obs_columns=[c for c in args.obs_columns.split(",") if c],
        validation_fraction=args.validation_fraction,
        chunk_size=args.chunk_size,
        rows=args.rows,
        threads=args.threads,
        overwrite=args.overwrite,
        parquet_encoding=args.parquet_encoding,
    )
    log.info("%s: %d cells, %d tokens -> %s", args.h5ad, stats.n_cells, stats.n_tokens, args.output)
