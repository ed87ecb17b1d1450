"""``gfw embed``: per-cell embeddings of a tokenized corpus from a Hugging Face ``BertForMaskedLM`` directory.

    gfw embed --model results/export/10m results/tokenized/pbmc/shard-*.parquet -o cells.h5ad [--layer -1]

Writes an AnnData with one row per corpus cell (obs names = ``cell_id``, obs = the corpus' other columns such
as ``length`` and ``split``, plus ``corpus_file``) and no genes. The embeddings are in ``obsm``:

* ``X_geneformer_mean``: the mean of the chosen layer's hidden states over the cell's gene tokens (special
  tokens and padding excluded), as Geneformer's ``EmbExtractor`` does;
* ``X_geneformer_cls``: the hidden state of the ``<cls>`` token, only when the vocabulary has one (v2 preset).

``--layer`` indexes Hugging Face's ``hidden_states``: 0 is the embedding output, 1..L the layer outputs and -1 the
last layer. Geneformer's ``EmbExtractor(emb_layer=-1)`` (its default, the second-to-last layer) is ``--layer -2``
here, and its ``emb_layer=0`` is ``--layer -1``.

Cells are read in chunks and sorted by length inside a chunk, so batches carry little padding and memory stays
bounded; the output keeps the corpus order. Shape legend: B cells in a batch, T tokens, H hidden.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .model import GeneformerForMaskedLM, load_hf_directory

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["EmbeddingSettings", "cli_main", "embed_corpus", "pool_hidden_states"]

log = logging.getLogger(__name__)

TOKEN_DICTIONARY = "token_dictionary.json"
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
MEAN_KEY = "X_geneformer_mean"
CLS_KEY = "X_geneformer_cls"


@dataclass(frozen=True)
class EmbeddingSettings:
    """How the hidden states are taken and pooled.

    Attributes:
        layer: Index into Hugging Face's ``hidden_states`` (0 = embeddings, -1 = last layer).
        batch_size: Cells per forward pass.
        chunk_cells: Cells read (and sorted by length) at a time; bounds memory.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    layer: int = -1
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
) -> AnnData:
    """Embed every cell of the corpus files and return (and optionally write) the AnnData.

    Args:
        model_dir: A Hugging Face ``BertForMaskedLM`` directory (``gfw export`` output or a public Geneformer one).
        corpus: Parquet files from ``gfw tokenize`` (columns ``input_ids``, ``cell_id``; others go to obs).
        out: ``.h5ad`` to write (atomically); None writes nothing.
        settings: Layer, batch size, chunk size and device.
        token_dictionary: The model's token dictionary; default ``model_dir/token_dictionary.json``.

    Returns:
        The ``anndata.AnnData`` with ``obsm["X_geneformer_mean"]`` (and ``obsm["X_geneformer_cls"]``).
    """
    import anndata as ad

    model = load_hf_directory(model_dir)
    layer = _check_layer(settings.layer, model, model_dir)
    tokens = _load_tokens(Path(model_dir), token_dictionary)
    device = _device(settings.device)
    model.to(device)
    special_ids = sorted({tokens[t] for t in SPECIAL_TOKENS if t in tokens} | {model.config.pad_token_id})
    cls_id = tokens.get("<cls>")
    means, cls_rows, obs_parts = [], [], []
    for path in map(Path, corpus):
        _check_vocabulary(path, tokens)
        n_cells = 0
        for ids, obs in _read_chunks(path, settings.chunk_cells, model.config.vocab_size):
            mean, cls = _embed_chunk(
                model, ids, layer=layer, settings=settings, special_ids=special_ids, cls_id=cls_id
            )
            means.append(mean)
            cls_rows.append(cls)
            obs_parts.append(obs.assign(corpus_file=str(path)))
            n_cells += len(obs)
        log.info("%s: embedded %d cells (layer %d)", path, n_cells, layer)
    obs = _obs_frame(obs_parts)
    adata = ad.AnnData(obs=obs)
    hidden = model.config.hidden_size
    adata.obsm[MEAN_KEY] = np.concatenate(means) if means else np.zeros((0, hidden), np.float32)
    if cls_id is not None:
        adata.obsm[CLS_KEY] = np.concatenate(cls_rows) if cls_rows else np.zeros((0, hidden), np.float32)
    adata.uns["geneformer_embedding"] = {
        "model_dir": str(model_dir),
        "layer": layer,
        "num_hidden_layers": model.config.num_hidden_layers,
        "pooling": "mean over gene tokens (special tokens and padding excluded)",
    }
    if out is not None:
        from ._atomic import atomic_path

        with atomic_path(out) as tmp:
            adata.write_h5ad(tmp)
    return adata


def _check_layer(layer: int, model: GeneformerForMaskedLM, model_dir: str | Path) -> int:
    n_states = model.config.num_hidden_layers + 1  # embeddings output + one per layer
    if not -n_states <= layer < n_states:
        msg = (
            f"--layer {layer} is out of range for {model_dir} ({model.config.num_hidden_layers} layers): "
            f"use 0..{n_states - 1} or -1..-{n_states} (-1 = last layer)"
        )
        raise ValueError(msg)
    return layer


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
    from .vocab import load_token_dictionary

    return load_token_dictionary(path)


def _check_vocabulary(path: Path, tokens: dict[str, int]) -> None:
    """Compare the corpus manifest's dictionary checksum (when there is one) with the model's dictionary."""
    if not path.is_file():
        msg = f"corpus file {path} does not exist"
        raise ValueError(msg)
    manifest = Path(f"{path.with_suffix('')}.manifest.json")
    if not manifest.is_file():
        return
    from .vocab import token_dictionary_sha256

    expected = json.loads(manifest.read_text()).get("token_dictionary_sha256")
    if expected is not None and expected != token_dictionary_sha256(tokens):
        msg = (
            f"{path} was tokenized with another token dictionary than the model's ({manifest} records a different "
            "checksum); tokenize the cells with the model's token_dictionary.json"
        )
        raise ValueError(msg)


def _read_chunks(path: Path, chunk_cells: int, vocab_size: int) -> Iterator[tuple[list[np.ndarray], pd.DataFrame]]:
    """(token id arrays, obs rows) per chunk of ``path``; obs has the corpus columns other than ``input_ids``."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
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
    parser.add_argument("corpus", nargs="+", type=Path, help="corpus parquet files from `gfw tokenize`")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face BertForMaskedLM directory")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output .h5ad")
    parser.add_argument("--layer", type=int, default=-1, help="hidden_states index: 0 embeddings, -1 last layer")
    parser.add_argument("--batch-size", type=int, default=16, help="cells per forward pass (default 16)")
    parser.add_argument("--chunk-cells", type=int, default=4096, help="cells read and length-sorted at a time")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--token-dictionary", type=Path, default=None, help="default: the model directory's token_dictionary.json"
    )
    return parser


def cli_main(argv: list[str]) -> int:
    """Entry point of ``gfw embed``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.chunk_cells < 1:
        print("gfw embed: error: --batch-size and --chunk-cells must be at least 1", file=sys.stderr)
        return 2
    settings = EmbeddingSettings(
        layer=args.layer, batch_size=args.batch_size, chunk_cells=args.chunk_cells, device=args.device
    )
    from ._io import InputError

    try:
        adata = embed_corpus(
            args.model, args.corpus, args.output, settings=settings, token_dictionary=args.token_dictionary
        )
    except (InputError, ValueError, FileNotFoundError) as err:
        print(f"gfw embed: error: {err}", file=sys.stderr)
        return 2
    keys = ", ".join(adata.obsm.keys())
    print(f"embedded {adata.n_obs} cells ({keys}) -> {args.output}")
    return 0
