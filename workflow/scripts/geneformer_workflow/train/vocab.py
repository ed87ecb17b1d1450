"""The token dictionary as the trainer needs it: size, special ids and the gene ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..presets import CLS, EOS, MASK, PAD
from ..tokenize.vocab import SPECIAL_TOKENS, TOKEN_DICTIONARY, token_dictionary_sha256


@dataclass(frozen=True)
class Vocab:
    """Vocabulary facts read from ``token_dictionary.json`` at run time.

    Attributes:
        size: Number of token ids (``max id + 1``); the model's ``vocab_size``.
        pad_id: Id of ``<pad>`` (0 in Geneformer).
        mask_id: Id of ``<mask>`` (1 in Geneformer).
        cls_id: Id of ``<cls>`` (V2 presets), else None.
        eos_id: Id of ``<eos>`` (V2 presets), else None.
        gene_ids: Every id that is not a special token, ascending: the pool for random replacement.
        sha256: Checksum of the (token, id) pairs (as in the corpus manifests), recorded in checkpoints.
    """

    size: int
    pad_id: int
    mask_id: int
    cls_id: int | None
    eos_id: int | None
    gene_ids: np.ndarray
    sha256: str = ""  # token_dictionary_sha256 of the (token, id) pairs: the vocabulary's identity

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that are never masked and never used as random replacements."""
        return tuple(i for i in (self.pad_id, self.mask_id, self.cls_id, self.eos_id) if i is not None)


def load_vocab(vocab_dir: str | Path) -> Vocab:
    """Read ``<vocab_dir>/token_dictionary.json`` and check it is a dense 0..V-1 numbering."""
    path = Path(vocab_dir) / TOKEN_DICTIONARY
    if not path.is_file():
        msg = (
            f"data.vocab_dir={str(vocab_dir)!r} has no {TOKEN_DICTIONARY}; point it at the tokenizer's vocab directory"
        )
        raise ValueError(msg)
    with path.open() as fh:
        mapping: dict[str, int] = json.load(fh)
    ids = sorted(int(v) for v in mapping.values())
    if ids != list(range(len(ids))):
        msg = f"{path}: token ids must be 0..{len(ids) - 1} without gaps or duplicates"
        raise ValueError(msg)
    for required in (PAD, MASK):
        if required not in mapping:
            msg = f"{path}: the special token {required} is missing"
            raise ValueError(msg)
    special = {mapping[t] for t in SPECIAL_TOKENS if t in mapping}
    gene_ids = np.array([i for i in ids if i not in special], dtype=np.int64)
    if gene_ids.size == 0:
        msg = f"{path}: no gene tokens besides the special tokens"
        raise ValueError(msg)
    return Vocab(
        size=len(ids),
        pad_id=int(mapping[PAD]),
        mask_id=int(mapping[MASK]),
        cls_id=mapping.get(CLS),
        eos_id=mapping.get(EOS),
        gene_ids=gene_ids,
        sha256=token_dictionary_sha256({str(k): int(v) for k, v in mapping.items()}),
    )
