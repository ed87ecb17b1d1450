"""``gfw evaluate``: score cell embeddings of models (and baselines) against the cell types of an annotated file.

    gfw evaluate DATA.h5ad --label-key cell_type [--batch-key batch] --model NAME MODEL_DIR [...]
                 [--dictionaries NAME TOKEN_DICTIONARY GENE_MEDIANS] [--random-weights NAME ...] [--pca]
                 --scores scores.tsv [--embeddings embeddings.h5ad] [--table scores.html] [--umap umap.png]

A model directory of this workflow (``gfw export``) carries its token dictionary and gene medians; a public
Geneformer checkpoint needs them named with ``--dictionaries``. Scores and their meaning: ``evaluate.scores``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .embed import GENEFORMER_EMB_LAYERS, EmbeddingSettings, LayerSelection
from .embeddings import CHECKPOINT, PRETRAINED, CountsSource, ModelSpec
from .run import EvaluationOutputs, EvaluationPlan, evaluate_dataset
from .scores import ScoreSettings


def build_parser() -> argparse.ArgumentParser:
    """``gfw evaluate`` arguments."""
    parser = argparse.ArgumentParser(prog="gfw evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("h5ad", type=Path, help="annotated raw-count .h5ad")
    parser.add_argument("--label-key", required=True, help="obs column with the cell types")
    parser.add_argument("--batch-key", default=None, help="obs column with the batches (adds the batch-mixing score)")
    models = parser.add_argument_group("models")
    models.add_argument(
        "--model",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "MODEL_DIR"),
        help="a Hugging Face BertForMaskedLM directory to evaluate (repeatable)",
    )
    models.add_argument(
        "--dictionaries",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "TOKEN_DICTIONARY", "GENE_MEDIANS"),
        help="the dictionaries of model NAME (e.g. Geneformer's pickles for a public checkpoint); default: the "
        "model directory's token_dictionary.json and gene_median_dictionary.pkl",
    )
    models.add_argument(
        "--random-weights",
        nargs="+",
        default=[],
        metavar="NAME",
        help="also evaluate these models' architecture with random weights (what pretraining added)",
    )
    models.add_argument("--pca", action="store_true", help="add PCA of log-normalised highly variable genes")
    out = parser.add_argument_group("outputs (written together or not at all)")
    out.add_argument("--scores", type=Path, required=True, help="table of scores, one row per model (TSV)")
    out.add_argument("--embeddings", type=Path, default=None, help="the scored cells' embeddings (.h5ad obsm)")
    out.add_argument("--table", type=Path, default=None, help="the table as an HTML page (for the report)")
    out.add_argument("--umap", type=Path, default=None, help="UMAPs coloured by label, one per model (.png)")
    out.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
    scores = parser.add_argument_group("scores")
    scores.add_argument("--n-folds", type=int, default=5, help="cross-validation folds (default 5)")
    scores.add_argument("--n-neighbors", type=int, default=15, help="kNN classifier and graph neighbours")
    scores.add_argument("--leiden-resolution", type=float, default=1.0, help="Leiden resolution (default 1)")
    scores.add_argument("--seed", type=int, default=0, help="seed of folds, probe, graph, Leiden, random weights")
    data = parser.add_argument_group("input and embedding")
    data.add_argument("--counts", default="X", help="where the raw counts are: X, raw or layers/<name>")
    data.add_argument("--gene-id-key", default=None, help="var column with the gene ids (default: the var index)")
    data.add_argument("--gene-mapping", default=None, help="gene id -> Ensembl id mapping file, or GRCh38")
    layer = data.add_mutually_exclusive_group()
    layer.add_argument(
        "--geneformer-emb-layer",
        type=int,
        choices=GENEFORMER_EMB_LAYERS,
        default=-1,
        help="layer, EmbExtractor numbering: -1 = second-to-last (default), 0 = last",
    )
    layer.add_argument("--hidden-state", type=int, default=None, metavar="N", help="layer as a hidden_states index")
    data.add_argument("--batch-size", type=int, default=16, help="cells per forward pass")
    data.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser


def _plan(args: argparse.Namespace) -> EvaluationPlan:
    from ..tokenize.genes import load_gene_mapping
    from ._labels import EvaluationInputError

    names = [name for name, _ in args.model]
    for name in [d[0] for d in args.dictionaries] + args.random_weights:
        if name not in names:
            msg = f"--dictionaries/--random-weights name {name!r} is not a --model name ({names})"
            raise EvaluationInputError(msg)
    dictionaries = {name: (Path(tokens), Path(medians)) for name, tokens, medians in args.dictionaries}
    specs = []
    for name, model_dir in args.model:
        tokens, medians = dictionaries.get(name, (None, None))
        specs.append(ModelSpec(name, Path(model_dir), tokens, medians, CHECKPOINT if tokens else PRETRAINED))
    specs += [spec.random_twin() for spec in specs if spec.name in args.random_weights]
    mapping = load_gene_mapping(args.gene_mapping) if args.gene_mapping else None
    source = CountsSource(counts=args.counts, gene_id_key=args.gene_id_key, gene_mapping=mapping)
    return EvaluationPlan(args.h5ad, args.label_key, args.batch_key, tuple(specs), args.pca, source)


def cli_main(argv: list[str]) -> int:
    """Entry point of ``gfw evaluate``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.n_folds < 2 or args.n_neighbors < 1 or args.batch_size < 1 or not args.leiden_resolution > 0:
        print(
            "gfw evaluate: error: --n-folds must be >= 2, --n-neighbors and --batch-size >= 1, "
            "--leiden-resolution > 0",
            file=sys.stderr,
        )
        return 2
    layer = (
        LayerSelection.hidden_state(args.hidden_state)
        if args.hidden_state is not None
        else LayerSelection.geneformer(args.geneformer_emb_layer)
    )
    from ..tokenize.h5ad import InputError

    try:
        table = evaluate_dataset(
            _plan(args),
            EvaluationOutputs(args.scores, args.embeddings, args.table, args.umap),
            scores=ScoreSettings(args.n_folds, args.n_neighbors, args.leiden_resolution, args.seed),
            embedding=EmbeddingSettings(layer=layer, batch_size=args.batch_size, device=args.device),
            overwrite=args.overwrite,
        )
    except (InputError, ValueError, FileNotFoundError) as err:  # EvaluationInputError, OutputError: ValueErrors
        print(f"gfw evaluate: error: {err}", file=sys.stderr)
        return 2
    columns = ["model", "n_cells", "knn_macro_f1", "probe_macro_f1", "leiden_ari", "label_silhouette"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"-> {args.scores}")
    return 0
