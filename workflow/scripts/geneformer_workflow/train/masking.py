"""Geneformer's masked-LM corruption, with randomness keyed per cell.

The rules are those of Hugging Face's ``DataCollatorForLanguageModeling`` that Geneformer
trains with: each maskable token is selected with probability ``mlm_probability``; a
selected token becomes ``<mask>`` with probability 0.8, a random *gene* token with 0.1 and
stays unchanged with 0.1. Special tokens (``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``) are
never selected; random replacements are drawn from the gene tokens only (Hugging Face draws
from the whole vocabulary, specials included).

Randomness comes from a generator seeded by ``(seed, stream, epoch, cell_index)``, so a
cell's mask does not depend on which rank, micro-batch or world size processed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.bert import IGNORE_INDEX as IGNORE_INDEX  # labels that do not count in the loss: the model's value
from .vocab import Vocab

TRAIN_STREAM = 0  # RNG stream of training masks
VALIDATION_STREAM = 1  # RNG stream of validation masks (fixed across evaluations)


@dataclass(frozen=True)
class MaskingConfig:
    """Masking probabilities and the token ids they act on."""

    mlm_probability: float
    mask_token_id: int
    special_ids: tuple[int, ...]
    gene_ids: np.ndarray
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1

    @classmethod
    def from_vocab(
        cls, vocab: Vocab, *, mlm_probability: float, mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1
    ) -> MaskingConfig:
        """Build the config from the run's vocabulary, checking the probabilities."""
        if not 0.0 < mlm_probability < 1.0:
            msg = f"data.mlm_probability={mlm_probability} must be in (0, 1); Geneformer uses 0.15"
            raise ValueError(msg)
        if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1:
            msg = (
                f"data.mask_replace_prob={mask_replace_prob} and data.random_replace_prob={random_replace_prob} "
                "must be >= 0 with a sum <= 1 (BERT uses 0.8 and 0.1)"
            )
            raise ValueError(msg)
        return cls(
            mlm_probability=mlm_probability,
            mask_token_id=vocab.mask_id,
            special_ids=vocab.special_ids,
            gene_ids=vocab.gene_ids,
            mask_replace_prob=mask_replace_prob,
            random_replace_prob=random_replace_prob,
        )


def cell_rng(seed: int, stream: int, epoch: int, cell_index: int) -> np.random.Generator:
    """The generator for one cell in one epoch; independent of rank and batch layout."""
    return np.random.default_rng([seed, stream, epoch, cell_index])


def mask_tokens(
    token_ids: np.ndarray, rng: np.random.Generator, config: MaskingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt one cell's tokens for masked-LM training.

    Args:
        token_ids: (T,) int token ids of one cell, unpadded.
        rng: The cell's generator (see :func:`cell_rng`).
        config: Probabilities and ids.

    Returns:
        ``(input_ids, labels)``, both (T,) int64; labels are the original ids at the
        selected positions and ``IGNORE_INDEX`` elsewhere.

    Example:
        >>> cfg = MaskingConfig(0.5, mask_token_id=1, special_ids=(0, 1), gene_ids=np.arange(2, 10))
        >>> inputs, labels = mask_tokens(np.array([5, 6, 7, 8, 9]), np.random.default_rng(0), cfg)
        >>> bool(((labels == -100) | (labels == np.array([5, 6, 7, 8, 9]))).all())
        True
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    # Draw every random number up front so a cell consumes its stream the same way whatever the outcome.
    u_select, u_action = rng.random(ids.shape[0]), rng.random(ids.shape[0])
    random_pick = rng.integers(0, config.gene_ids.shape[0], size=ids.shape[0])
    maskable = ~np.isin(ids, np.asarray(config.special_ids, dtype=np.int64))
    selected = maskable & (u_select < config.mlm_probability)
    to_mask = selected & (u_action < config.mask_replace_prob)
    to_random = selected & ~to_mask & (u_action < config.mask_replace_prob + config.random_replace_prob)
    labels = np.where(selected, ids, IGNORE_INDEX)
    inputs = ids.copy()
    inputs[to_mask] = config.mask_token_id
    inputs[to_random] = config.gene_ids[random_pick[to_random]]
    return inputs, labels
