"""``gfw embed``: per-cell embeddings of a tokenized corpus from a Hugging Face ``BertForMaskedLM`` directory.

    gfw embed --model results/export/10m results/tokenized/pbmc/dataset.json -o cells.h5ad [--overwrite]
              [--geneformer-emb-layer -1 | --hidden-state N]

The corpus is given as dataset indexes (``dataset.json``, or a directory holding one; the exact shards it lists
are read) and/or corpus parquet files. Writes an AnnData with one row per corpus cell (obs names = ``cell_id``,
obs = the corpus' other columns such as ``length`` and ``split``, plus ``corpus_file``) and no genes. The
embeddings are in ``obsm``:

* ``X_geneformer_mean``: the mean of the chosen layer's hidden states over the cell's gene tokens (special
  tokens and padding excluded), as Geneformer's ``EmbExtractor`` does;
* ``X_geneformer_cls``: the hidden state of the ``<cls>`` token, only when the vocabulary has one (v2 preset).

Which layer: two numberings, each with its own option, so that a number is never read in the wrong one
(see :class:`LayerSelection`). ``--geneformer-emb-layer`` is ``EmbExtractor``'s ``emb_layer``: -1 (the default
on both sides) is the second-to-last layer, 0 the last. ``--hidden-state N`` indexes transformers'
``hidden_states``: 0 is the embedding output, N the output of layer N, -1 the last layer. The old ``--layer``
(which was a ``hidden_states`` index) is refused with this mapping.

Cells are read in chunks and sorted by length inside a chunk, so batches carry little padding and memory stays
bounded; the output keeps the corpus order. Shape legend: B cells in a batch, T tokens, H hidden.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..model import GeneformerForMaskedLM, load_hf_directory
from ..tokenize.vocab import SPECIAL_TOKENS, TOKEN_DICTIONARY

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["EmbeddingSettings", "LayerSelection", "cli_main", "embed_corpus", "pool_hidden_states"]

log = logging.getLogger(__name__)

MEAN_KEY = "X_geneformer_mean"
CLS_KEY = "X_geneformer_cls"
GENEFORMER = "geneformer"
HIDDEN_STATES = "hidden_states"
# Geneformer's EmbExtractor accepts emb_layer -1 or 0 only (EmbExtractor.valid_option_dict["emb_layer"]).
GENEFORMER_EMB_LAYERS = (-1, 0)


@dataclass(frozen=True)
class LayerSelection:
    """Which layer's hidden states are pooled, in one of two numberings that are never mixed.

    With L encoder layers, transformers' ``hidden_states`` has L + 1 entries: ``[0]`` is the embedding output
    and ``[N]`` the output of layer N.

    * ``geneformer`` numbering, Geneformer ``EmbExtractor``'s ``emb_layer``: -1 (its default) is the
      second-to-last layer, ``hidden_states[L - 1]``; 0 is the last layer, ``hidden_states[L]``. Upstream computes
      ``layer_to_quant = pu.quant_layers(model) + self.emb_layer`` (``geneformer/emb_extractor.py``,
      ``EmbExtractor.extract_embs``), where ``quant_layers`` (``geneformer/perturber_utils.py``) returns the
      number of layers, and then takes ``outputs.hidden_states[layer_to_quant]`` (``get_embs``).
    * ``hidden_states`` numbering: an index into that tuple, negative from the end (-1 = the last layer).

    Beware a third convention: helical's Geneformer wrapper (``helical/models/geneformer/model.py``, helical 2.2.0)
    passes its ``emb_layer`` straight to ``hidden_states`` (its -1 is the last layer): that is
    ``LayerSelection.hidden_state(-1)`` here, not ``geneformer(-1)``.

    Attributes:
        numbering: ``"geneformer"`` or ``"hidden_states"``.
        value: The number in that numbering.

    Example:
        >>> LayerSelection.geneformer(-1).index(num_hidden_layers=6)
        5
        >>> LayerSelection.hidden_state(-1).index(num_hidden_layers=6)
        6
    """

    numbering: str = GENEFORMER
    value: int = -1

    def __post_init__(self) -> None:
        if self.numbering not in (GENEFORMER, HIDDEN_STATES):
            msg = f"LayerSelection numbering {self.numbering!r}: use {GENEFORMER!r} or {HIDDEN_STATES!r}"
            raise ValueError(msg)
        if self.numbering == GENEFORMER and self.value not in GENEFORMER_EMB_LAYERS:
            msg = (
                f"--geneformer-emb-layer {self.value}: Geneformer's EmbExtractor takes emb_layer -1 (the "
                "second-to-last layer, its default) or 0 (the last layer); for any other layer use --hidden-state N "
                "(0 = embedding output, N = output of layer N, -1 = last layer)"
            )
            raise ValueError(msg)

    @classmethod
    def geneformer(cls, emb_layer: int = -1) -> LayerSelection:
        """Geneformer ``EmbExtractor``'s ``emb_layer``: -1 = second-to-last layer (its default), 0 = last."""
        return cls(GENEFORMER, emb_layer)

    @classmethod
    def hidden_state(cls, index: int) -> LayerSelection:
        """An index into transformers' ``hidden_states``: 0 = embedding output, N = layer N, -1 = last layer."""
        return cls(HIDDEN_STATES, index)

    @property
    def option(self) -> str:
        """The ``gfw embed`` option that selects it, e.g. ``--geneformer-emb-layer -1``."""
        flag = "--geneformer-emb-layer" if self.numbering == GENEFORMER else "--hidden-state"
        return f"{flag} {self.value}"

    def index(self, num_hidden_layers: int) -> int:
        """The non-negative index into ``hidden_states`` (0..L) for a model of ``num_hidden_layers`` layers.

        Raises:
            ValueError: a ``hidden_states`` index outside -(L + 1)..L.
        """
        n_states = num_hidden_layers + 1  # embedding output + one per layer
        if self.numbering == GENEFORMER:
            return num_hidden_layers + self.value  # EmbExtractor: quant_layers(model) + emb_layer
        if not -n_states <= self.value < n_states:
            msg = (
                f"{self.option} is out of range for a model of {num_hidden_layers} layers: use 0..{n_states - 1} "
                f"or -1..-{n_states} (0 = embedding output, -1 = last layer)"
            )
            raise ValueError(msg)
        return self.value % n_states

    def describe(self, num_hidden_layers: int) -> str:
        """E.g. ``hidden_states[5] (output of layer 5 of 6, the second-to-last; Geneformer emb_layer=-1)``."""
        index = self.index(num_hidden_layers)
        if index == 0:
            where = "the embedding output"
        else:
            where = f"output of layer {index} of {num_hidden_layers}"
            where += {0: ", the last", 1: ", the second-to-last"}.get(num_hidden_layers - index, "")
        emb_layer = index - num_hidden_layers
        if emb_layer in GENEFORMER_EMB_LAYERS and index > 0:
            where += f"; Geneformer emb_layer={emb_layer}"
        return f"hidden_states[{index}] ({where})"


@dataclass(frozen=True)
class EmbeddingSettings:
    """How the hidden states are taken and pooled.

    Attributes:
        layer: Which layer; the default is Geneformer ``EmbExtractor``'s default (the second-to-last layer).
        batch_size: Cells per forward pass.
        chunk_cells: Cells read (and sorted by length) at a time; bounds memory.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    layer: LayerSelection = LayerSelection()
    batch_size: int = 16
    chunk_cells: int = 4096
    device: str = "auto"


def pool_hidden_states(
    hidden_BTH: torch.Tensor, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, special_ids: list[int]
) -> torch.Tensor:
    """Mean of ``hidden_BTH`` over the positions that are real tokens and not special tokens: (B, H) float32."""
    keep_BT = attention_mask_BT.bool() & ~torch.isin(
        input_ids_BT, torch.tensor(special_ids, device=input_ids_BT.device)
    )
    keep_BT1 = keep_BT.unsqueeze(-1).to(torch.float32)
    total_BH = (hidden_BTH.to(torch.float32) * keep_BT1).sum(dim=1)
    return total_BH / keep_BT1.sum(dim=1).clamp(min=1.0)  # a cell without gene tokens gets zeros, not NaN


def embed_corpus(
    model_dir: str | Path,
    corpus: list[str | Path],
    out: str | Path | None = None,
    *,
    settings: EmbeddingSettings = EmbeddingSettings(),
    token_dictionary: str | Path | None = None,
    overwrite: bool = True,
) -> AnnData:
    """Embed every cell of the corpus and return (and optionally write) the AnnData.

    Args:
        model_dir: A Hugging Face ``BertForMaskedLM`` directory (``gfw export`` output or a public Geneformer one).
        corpus: Dataset indexes (``dataset.json`` or a directory holding one) and/or corpus parquet files
            (columns ``input_ids``, ``cell_id``; others go to obs), read in this order.
        out: ``.h5ad`` to write (atomically); None writes nothing.
        settings: Layer, batch size, chunk size and device.
        token_dictionary: The model's token dictionary; default ``model_dir/token_dictionary.json``.
        overwrite: Whether an existing ``out`` may be replaced (an input never is).

    Returns:
        The ``anndata.AnnData`` with ``obsm["X_geneformer_mean"]`` (and ``obsm["X_geneformer_cls"]``).

    Raises:
        InputError: a corpus entry is missing, or a shard is incomplete.
        OutputError: ``out`` exists (without ``overwrite``), is a directory or is one of the inputs.
        ValueError: the layer is out of range, or the corpus was tokenized with another vocabulary.
    """
    import anndata as ad

    from ..atomic import atomic_path, check_outputs
    from ..tokenize.corpus_index import resolve_corpus_inputs

    shards = resolve_corpus_inputs(list(corpus))
    inputs = [model_dir, token_dictionary, *corpus, *shards]
    if out is not None:
        check_outputs([out], inputs=inputs, overwrite=overwrite)  # fail in a second, not after the embedding
    model = load_hf_directory(model_dir)
    layer = settings.layer.index(model.config.num_hidden_layers)
    tokens = _load_tokens(Path(model_dir), token_dictionary)
    for path in shards:
        _check_vocabulary(path, tokens)
    device = _device(settings.device)
    model.to(device)
    special_ids = sorted({tokens[t] for t in SPECIAL_TOKENS if t in tokens} | {model.config.pad_token_id})
    cls_id = tokens.get("<cls>")
    described = settings.layer.describe(model.config.num_hidden_layers)
    log.info("pooling %s, selected by %s", described, settings.layer.option)
    means, cls_rows, obs_parts = [], [], []
    for path in shards:
        n_cells = 0
        for ids, obs in _read_chunks(path, settings.chunk_cells, model.config.vocab_size):
            mean, cls = _embed_chunk(
                model, ids, layer=layer, settings=settings, special_ids=special_ids, cls_id=cls_id
            )
            means.append(mean)
            cls_rows.append(cls)
            obs_parts.append(obs.assign(corpus_file=str(path)))
            n_cells += len(obs)
        log.info("%s: embedded %d cells", path, n_cells)
    obs = _obs_frame(obs_parts)
    adata = ad.AnnData(obs=obs)
    hidden = model.config.hidden_size
    adata.obsm[MEAN_KEY] = np.concatenate(means) if means else np.zeros((0, hidden), np.float32)
    if cls_id is not None:
        adata.obsm[CLS_KEY] = np.concatenate(cls_rows) if cls_rows else np.zeros((0, hidden), np.float32)
    adata.uns["geneformer_embedding"] = {
        "model_dir": str(model_dir),
        "layer": layer,  # the index into hidden_states (0..L)
        "layer_description": described,
        "layer_option": settings.layer.option,
        "num_hidden_layers": model.config.num_hidden_layers,
        "pooling": "mean over gene tokens (special tokens and padding excluded)",
    }
    if out is not None:
        with atomic_path(out, inputs=inputs, overwrite=overwrite) as tmp:
            adata.write_h5ad(tmp)
    return adata


def _load_tokens(model_dir: Path, token_dictionary: str | Path | None) -> dict[str, int]:
    path = Path(token_dictionary) if token_dictionary is not None else model_dir / TOKEN_DICTIONARY
    if path.is_dir():
        path = path / TOKEN_DICTIONARY
    if not path.is_file():
        msg = (
            f"{path} not found: the special tokens come from the model's token dictionary; "
            "pass --token-dictionary (e.g. Geneformer's token_dictionary pickle for a public checkpoint)"
        )
        raise ValueError(msg)
    from ..tokenize.vocab import load_token_dictionary

    return load_token_dictionary(path)


def _check_vocabulary(path: Path, tokens: dict[str, int]) -> None:
    """Compare the shard manifest's dictionary checksum (when there is one) with the model's dictionary."""
    from ..tokenize.corpus_index import manifest_path, verify_shard
    from ..tokenize.vocab import token_dictionary_sha256

    manifest = verify_shard(path)  # None: a parquet file that `gfw tokenize` did not write, taken as it is
    expected = (manifest or {}).get("token_dictionary_sha256")
    if expected is not None and expected != token_dictionary_sha256(tokens):
        msg = (
            f"{path} was tokenized with another token dictionary than the model's ({manifest_path(path).name} "
            "records a different checksum); tokenize the cells with the model's token_dictionary.json"
        )
        raise ValueError(msg)


def _read_chunks(path: Path, chunk_cells: int, vocab_size: int) -> Iterator[tuple[list[np.ndarray], pd.DataFrame]]:
    """(token id arrays, obs rows) per chunk of ``path``; obs has the corpus columns other than ``input_ids``."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path, pre_buffer=False)  # pyarrow's pre_buffer would keep the whole shard in memory
    names = parquet.schema_arrow.names
    missing = [c for c in ("input_ids", "cell_id") if c not in names]
    if missing:
        msg = f"{path} has no column(s) {missing}; expected a corpus from `gfw tokenize`"
        raise ValueError(msg)
    for batch in parquet.iter_batches(batch_size=chunk_cells):
        column = batch.column("input_ids")
        flat = column.values.to_numpy(zero_copy_only=False)
        if flat.size and (int(flat.max()) >= vocab_size or int(flat.min()) < 0):
            msg = (
                f"{path} has token ids outside 0..{vocab_size - 1}, the model's vocabulary; "
                "tokenize the cells with the model's token dictionary"
            )
            raise ValueError(msg)
        offsets = column.offsets.to_numpy()
        ids = [flat[offsets[i] - offsets[0] : offsets[i + 1] - offsets[0]] for i in range(len(column))]
        obs = batch.drop_columns(["input_ids"]).to_pandas()
        yield ids, obs


def _embed_chunk(
    model: GeneformerForMaskedLM,
    ids: list[np.ndarray],
    *,
    layer: int,
    settings: EmbeddingSettings,
    special_ids: list[int],
    cls_id: int | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean (and ``<cls>``) embeddings of one chunk, in the chunk's order: (N, H) float32 arrays."""
    device = next(model.parameters()).device
    max_len = model.config.max_position_embeddings
    too_long = sum(len(x) > max_len for x in ids)
    if too_long:
        log.warning("%d cells are longer than the model's %d positions; their tail is cut", too_long, max_len)
    hidden = model.config.hidden_size
    mean_NH = np.zeros((len(ids), hidden), np.float32)
    cls_NH = np.zeros((len(ids), hidden), np.float32) if cls_id is not None else None
    # Longest first, so that a too-large batch fails at once; neighbours in length share a batch (little padding).
    order = np.argsort([-min(len(x), max_len) for x in ids], kind="stable")
    for start in range(0, len(order), settings.batch_size):
        rows = order[start : start + settings.batch_size]
        ids_BT, mask_BT = _pad([ids[i][:max_len] for i in rows], model.config.pad_token_id)
        ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
        with torch.inference_mode():
            _, hidden_states = model.encode(ids_BT, mask_BT, output_hidden_states=True)
        hidden_BTH = hidden_states[layer]
        mean_NH[rows] = pool_hidden_states(hidden_BTH, ids_BT, mask_BT, special_ids).cpu().numpy()
        if cls_NH is not None:
            if not bool((ids_BT[:, 0] == cls_id).all()):
                msg = f"the vocabulary has <cls> (id {cls_id}) but some cells do not start with it; re-tokenize"
                raise ValueError(msg)
            cls_NH[rows] = hidden_BTH[:, 0].to(torch.float32).cpu().numpy()
    return mean_NH, cls_NH


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (B, T) int64 ids and (B, T) attention mask (1 = token)."""
    width = max((len(r) for r in rows), default=0)
    ids_BT = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids_BT[i, : len(row)] = torch.from_numpy(row.astype(np.int64))
        mask_BT[i, : len(row)] = 1
    return ids_BT, mask_BT


def _obs_frame(parts: list[pd.DataFrame]) -> pd.DataFrame:
    obs = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"cell_id": [], "corpus_file": []})
    index = pd.Index(obs.pop("cell_id").astype(str), name=None)
    obs["corpus_file"] = obs["corpus_file"].astype("category")
    obs.index = index
    if index.has_duplicates:
        log.warning(
            "%d cell ids occur more than once (several files?); obs names get a suffix", index.duplicated().sum()
        )
        obs.index = _unique(index)
    return obs


def _unique(index: pd.Index) -> pd.Index:
    """``anndata``'s ``obs_names_make_unique`` convention: the 2nd ``a`` becomes ``a-1``, the 3rd ``a-2``."""
    counts = index.to_series().groupby(index).cumcount().to_numpy()
    return pd.Index([name if n == 0 else f"{name}-{n}" for name, n in zip(index, counts, strict=True)])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda: no CUDA device is available; use --device cpu"
        raise ValueError(msg)
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    """``gfw embed`` arguments."""
    parser = argparse.ArgumentParser(prog="gfw embed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "corpus",
        nargs="+",
        type=Path,
        help="the corpus: dataset.json indexes (or their directories; exactly the shards they list are read) "
        "and/or corpus parquet files, in order",
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face BertForMaskedLM directory")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output .h5ad")
    layer = parser.add_mutually_exclusive_group()
    layer.add_argument(
        "--geneformer-emb-layer",
        type=int,
        choices=GENEFORMER_EMB_LAYERS,
        default=-1,
        help="layer in Geneformer EmbExtractor's emb_layer numbering: -1 = the second-to-last layer (the default, "
        "as EmbExtractor's default), 0 = the last layer",
    )
    layer.add_argument(
        "--hidden-state",
        type=int,
        default=None,
        metavar="N",
        help="instead, any layer as an index into transformers' hidden_states: 0 = the embedding output, "
        "N = the output of layer N, negative from the end (-1 = the last layer = --geneformer-emb-layer 0)",
    )
    parser.add_argument("--layer", type=int, default=None, help=argparse.SUPPRESS)  # removed: see _removed_layer
    parser.add_argument("--batch-size", type=int, default=16, help="cells per forward pass (default 16)")
    parser.add_argument("--chunk-cells", type=int, default=4096, help="cells read and length-sorted at a time")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--token-dictionary", type=Path, default=None, help="default: the model directory's token_dictionary.json"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (default: refuse); an input is never replaced",
    )
    return parser


def _removed_layer(value: int) -> str:
    """Why ``--layer`` is refused, and the options that select the layer it used to select."""
    same = {-1: " (= --geneformer-emb-layer 0)", -2: " (= --geneformer-emb-layer -1, the default)"}.get(value, "")
    return (
        "--layer was removed: its numbering (an index into transformers' hidden_states, -1 = the last layer) is "
        "easy to confuse with Geneformer's EmbExtractor emb_layer, where -1 is the second-to-last layer and 0 the "
        f"last. For the layer that --layer {value} selected, pass --hidden-state {value}{same}; "
        "--geneformer-emb-layer -1|0 takes EmbExtractor's numbering (its default, -1, is ours)"
    )


def cli_main(argv: list[str]) -> int:
    """Entry point of ``gfw embed``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.layer is not None:
        print(f"gfw embed: error: {_removed_layer(args.layer)}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.chunk_cells < 1:
        print("gfw embed: error: --batch-size and --chunk-cells must be at least 1", file=sys.stderr)
        return 2
    if args.hidden_state is not None:
        layer = LayerSelection.hidden_state(args.hidden_state)
    else:
        layer = LayerSelection.geneformer(args.geneformer_emb_layer)
    settings = EmbeddingSettings(
        layer=layer, batch_size=args.batch_size, chunk_cells=args.chunk_cells, device=args.device
    )
    from ..tokenize.h5ad import InputError

    try:
        adata = embed_corpus(
            args.model,
            args.corpus,
            args.output,
            settings=settings,
            token_dictionary=args.token_dictionary,
            overwrite=args.overwrite,
        )
    except (InputError, ValueError, FileNotFoundError) as err:  # OutputError is a ValueError
        print(f"gfw embed: error: {err}", file=sys.stderr)
        return 2
    keys = ", ".join(adata.obsm.keys())
    layer = adata.uns["geneformer_embedding"]["layer_description"]
    print(f"embedded {adata.n_obs} cells ({keys}; {layer}) -> {args.output}")
    return 0
