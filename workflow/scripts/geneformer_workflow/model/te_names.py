"""Transformer Engine <-> Hugging Face ``BertForMaskedLM`` state-dict keys (and TE's ``_extra_state`` entries).

``te.Linear`` and ``te.LayerNorm`` call their parameters ``weight`` / ``bias`` like ``nn.Linear`` / ``nn.LayerNorm``,
so every weight keeps its Hugging Face name; what differs is one ``_extra_state`` entry per TE module (FP8 metadata),
which ``te_state_dict_to_hf`` drops and ``hf_state_dict_to_te`` sets to ``None``. Plain data, no TE import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# HF BertForMaskedLM key -> key in a model built from te_primitives(); `*` is the layer index. te.Linear and
# te.LayerNorm name their parameters `weight` / `bias` exactly like nn.Linear / nn.LayerNorm, and the embeddings and
# the tied decoder stay plain nn modules, so every entry maps to itself. A fused-QKV variant would change the map.
_HF_KEYS: tuple[str, ...] = (
    # embeddings (nn.Embedding) and their LayerNorm (te.LayerNorm)
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    # self-attention projections (te.Linear)
    "bert.encoder.layer.*.attention.self.query.weight",
    "bert.encoder.layer.*.attention.self.query.bias",
    "bert.encoder.layer.*.attention.self.key.weight",
    "bert.encoder.layer.*.attention.self.key.bias",
    "bert.encoder.layer.*.attention.self.value.weight",
    "bert.encoder.layer.*.attention.self.value.bias",
    # attention output projection (te.Linear) and post-LN (te.LayerNorm)
    "bert.encoder.layer.*.attention.output.dense.weight",
    "bert.encoder.layer.*.attention.output.dense.bias",
    "bert.encoder.layer.*.attention.output.LayerNorm.weight",
    "bert.encoder.layer.*.attention.output.LayerNorm.bias",
    # feed-forward (te.Linear x 2) and post-LN (te.LayerNorm)
    "bert.encoder.layer.*.intermediate.dense.weight",
    "bert.encoder.layer.*.intermediate.dense.bias",
    "bert.encoder.layer.*.output.dense.weight",
    "bert.encoder.layer.*.output.dense.bias",
    "bert.encoder.layer.*.output.LayerNorm.weight",
    "bert.encoder.layer.*.output.LayerNorm.bias",
    # MLM head: transform (te.Linear, te.LayerNorm), output bias, and the decoder (nn.Linear, tied aliases)
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.bias",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
)
HF_TO_TE_KEYS: dict[str, str] = {key: key for key in _HF_KEYS}
TE_TO_HF_KEYS: dict[str, str] = {te_key: hf_key for hf_key, te_key in HF_TO_TE_KEYS.items()}
# Modules whose `_extra_state` TE writes: every te.Linear and te.LayerNorm above ...
TE_EXTRA_STATE_MODULES: tuple[str, ...] = (
    "bert.embeddings.LayerNorm",
    "bert.encoder.layer.*.attention.self.query",
    "bert.encoder.layer.*.attention.self.key",
    "bert.encoder.layer.*.attention.self.value",
    "bert.encoder.layer.*.attention.output.dense",
    "bert.encoder.layer.*.attention.output.LayerNorm",
    "bert.encoder.layer.*.intermediate.dense",
    "bert.encoder.layer.*.output.dense",
    "bert.encoder.layer.*.output.LayerNorm",
    "cls.predictions.transform.dense",
    "cls.predictions.transform.LayerNorm",
)
# ... and the attention core, at `core.dpa._extra_state` or below (TE versions moved the attention's FP8 metadata
# between DotProductAttention and its fused-attention child).
TE_EXTRA_STATE_TREES: tuple[str, ...] = ("bert.encoder.layer.*.attention.self.core",)
EXTRA_STATE_SUFFIX = "._extra_state"
# Tied aliases (HF key -> the key it shares storage with), as in hf.TIED_KEYS.
_TIED: dict[str, str] = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
_LAYER_INDEX = re.compile(r"(?<=^bert\.encoder\.layer\.)\d+(?=\.)")


def _pattern(key: str) -> tuple[str, str | None]:
    """``bert.encoder.layer.3.x`` -> (``bert.encoder.layer.*.x``, ``"3"``); other keys -> (key, None)."""
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + "*" + key[match.end() :], match.group()


def _apply(pattern: str, index: str | None) -> str:
    return pattern if index is None else pattern.replace("*", index, 1)


def is_te_extra_state_key(key: str) -> bool:
    """Whether ``key`` is an ``_extra_state`` entry that a TE module of this model writes."""
    if not key.endswith(EXTRA_STATE_SUFFIX):
        return False
    module, _ = _pattern(key.removesuffix(EXTRA_STATE_SUFFIX))
    return module in TE_EXTRA_STATE_MODULES or any(
        module == tree or module.startswith(tree + ".") for tree in TE_EXTRA_STATE_TREES
    )


def te_state_dict_to_hf(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A TE model's state dict -> HF ``BertForMaskedLM`` keys (values untouched, TE ``_extra_state`` dropped).

    The result has exactly the keys of ``BertForMaskedLM.state_dict()`` (tied aliases kept when present), so it
    loads with ``strict=True``. Strip wrapper prefixes (``module.``, ``_orig_mod.``) first, as ``hf.to_hf_state_dict``
    does.

    Raises:
        ValueError: For keys that are neither HF BERT keys nor the ``_extra_state`` of a TE module, listed.
    """
    converted: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        pattern, index = _pattern(key)
        if pattern in TE_TO_HF_KEYS:
            converted[_apply(TE_TO_HF_KEYS[pattern], index)] = value
        elif not is_te_extra_state_key(key):
            unknown.append(key)
    if unknown:
        msg = (
            f"{len(unknown)} state-dict keys are neither Hugging Face BertForMaskedLM keys nor the _extra_state of "
            f"a Transformer Engine module of this model: {_preview(unknown)}; is this a Geneformer BERT state dict?"
        )
        raise ValueError(msg)
    return converted


def hf_state_dict_to_te(state_dict: Mapping[str, Any], *, extra_state_keys: Iterable[str] = ()) -> dict[str, Any]:
    """HF ``BertForMaskedLM`` weights -> a state dict that a model built from ``te_primitives()`` loads strictly.

    Missing tied aliases (HF files leave them out) are added from their targets, and each of ``extra_state_keys``
    gets ``None``, which TE's ``set_extra_state`` reads as "no FP8 metadata yet"; pass the model's own ones::

        te_model.load_state_dict(hf_state_dict_to_te(
            tensors, extra_state_keys=[k for k in te_model.state_dict() if k.endswith("._extra_state")]), strict=True)

    Raises:
        ValueError: For keys that are not HF BERT keys, or extra-state keys that no TE module of this model has.
    """
    converted: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        pattern, index = _pattern(key)
        if pattern in HF_TO_TE_KEYS:
            converted[_apply(HF_TO_TE_KEYS[pattern], index)] = value
        else:
            unknown.append(key)
    extra = list(extra_state_keys)
    bad_extra = [key for key in extra if not is_te_extra_state_key(key)]
    if unknown or bad_extra:
        parts = ["cannot convert Hugging Face BERT weights to Transformer Engine names"]
        if unknown:
            parts.append(f"{len(unknown)} keys are not BertForMaskedLM keys: {_preview(unknown)}")
        if bad_extra:
            parts.append(
                f"{len(bad_extra)} extra-state keys belong to no TE module of this model: {_preview(bad_extra)}"
            )
        msg = "; ".join(parts)
        raise ValueError(msg)
    for alias, target in _TIED.items():
        if alias not in converted and target in converted:
            converted[alias] = converted[target]
    converted.update(dict.fromkeys(extra))
    return converted


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"
