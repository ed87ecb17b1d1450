"""Geneformer tokenization presets (DESIGN §4), the special tokens and the corpus's column names: no imports beyond
the standard library (the workflow's planning reads them)."""

from __future__ import annotations

from dataclasses import dataclass

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
# The corpus's own columns; obs columns kept beside them need other names (checked by gfw tokenize and the workflow).
CORPUS_COLUMNS = ("input_ids", "length", "cell_id", "split")


@dataclass(frozen=True)
class Preset:
    """How cells become token sequences.

    Attributes:
        name: ``v1`` (Genecorpus-30M models) or ``v2`` (gc104M models).
        max_length: tokens per cell including special tokens.
        special_tokens: whether each cell is wrapped as ``<cls>`` genes... ``<eos>``.
    """

    name: str
    max_length: int
    special_tokens: bool

    @property
    def specials(self) -> tuple[str, ...]:
        """Special tokens in id order, as in Geneformer's dictionaries."""
        return (PAD, MASK, CLS, EOS) if self.special_tokens else (PAD, MASK)

    @property
    def max_genes(self) -> int:
        """Gene tokens per cell (``max_length`` minus ``<cls>`` and ``<eos>`` for v2)."""
        return self.max_length - 2 if self.special_tokens else self.max_length


PRESETS: dict[str, Preset] = {
    "v1": Preset("v1", 2048, special_tokens=False),
    "v2": Preset("v2", 4096, special_tokens=True),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name with a helpful error."""
    try:
        return PRESETS[name]
    except KeyError:
        msg = f"unknown tokenizer preset {name!r}; choose one of {sorted(PRESETS)}"
        raise ValueError(msg) from None
