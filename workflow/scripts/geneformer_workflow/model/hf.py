"""Hugging Face interop: export to and import from a ``save_pretrained``-style ``BertForMaskedLM`` directory.

Our parameter names ARE the Hugging Face names (see ``layers.py``), so the key map is the identity apart from
the few keys listed below. State dicts of a Transformer Engine model go through ``te.te_state_dict_to_hf`` on
export, which drops TE's ``_extra_state`` entries and refuses keys that belong to no BERT module. A fused-QKV model
(``ModelConfig.fused_qkv``) is exported with its ``qkv`` weights split into HF's query / key / value (``qkv``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..atomic import atomic_path
from .bert import GeneformerForMaskedLM
from .config import ModelConfig
from .qkv import fuse_qkv, split_fused_qkv
from .te_names import te_state_dict_to_hf

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"

# Tied aliases: HF key -> the key it shares storage with. transformers' `save_pretrained` omits them (so do we);
# older checkpoints (e.g. the public Geneformer ones) may still contain them, and then they must equal the target.
TIED_KEYS: dict[str, str] = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
# Keys of other BERT checkpoints that this model has no place for; dropped on import with a warning.
IGNORED_IMPORT_KEYS: tuple[str, ...] = (
    "bert.embeddings.position_ids",  # a persistent buffer in transformers < 4.31
    "bert.embeddings.token_type_ids",
    "bert.pooler.dense.weight",  # BertModel / BertForPreTraining pooler
    "bert.pooler.dense.bias",
    "cls.seq_relationship.weight",  # BertForPreTraining next-sentence head
    "cls.seq_relationship.bias",
)
# Module-name segments that wrappers insert into state-dict keys (torch.compile, activation-checkpoint wrapper),
# and the leading prefix of DDP / megatron-fsdp wrappers.
_WRAPPER_SEGMENTS: tuple[str, ...] = ("_orig_mod.", "_checkpoint_wrapped_module.")
_WRAPPER_PREFIX = "module."


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (possibly wrapped) state dict -> the tensors a HF ``model.safetensors`` holds.

    Drops the tied aliases and Transformer Engine ``_extra_state``, strips wrapper prefixes, splits fused QKV weights
    into query / key / value, and makes every tensor a contiguous, detached CPU tensor; keys that belong to no BERT
    module raise a ``ValueError``. Pass a *full* (unsharded) state dict, e.g. from
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(
    full_state_dict=True, cpu_offload=True))``.
    """
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in _hf_items(state_dict)}


def _hf_items(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs of the keys that a HF checkpoint holds, tensors untouched (may be on meta)."""
    unwrapped = {}
    for key, tensor in state_dict.items():
        for segment in _WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        unwrapped[key.removeprefix(_WRAPPER_PREFIX)] = tensor
    unwrapped = split_fused_qkv(unwrapped)  # a fused-QKV model's qkv -> HF's query, key, value
    # TE models add `_extra_state` (FP8 metadata) per module; the conversion drops it and refuses unknown keys.
    return [(key, tensor) for key, tensor in te_state_dict_to_hf(unwrapped).items() if key not in TIED_KEYS]


def save_hf_directory(
    model: GeneformerForMaskedLM, out_dir: str | os.PathLike[str], *, vocab_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Export ``model`` as a directory that ``transformers.BertForMaskedLM.from_pretrained`` loads.

    Writes ``config.json`` (``BertConfig``, ``architectures=["BertForMaskedLM"]``) and ``model.safetensors``
    (HF BERT names, the model's dtype); with ``vocab_dir``, also copies every regular file in it (token dictionary,
    ``vocab.txt``, tokenizer files, ...). The directory is written under a temporary name next to ``out_dir`` and
    renamed at the end, so a killed export never looks complete; an existing ``out_dir`` is replaced only when
    the export rewrites every file in it (an earlier export), never a directory holding other files.

    Args:
        model: The model to export (not sharded; for FSDP use ``save_hf_state_dict`` with a full state dict).
        out_dir: Target directory.
        vocab_dir: Optional directory of tokenizer / vocabulary files to ship with the model.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    return save_hf_state_dict(model.state_dict(), model.config, out_dir, vocab_dir=vocab_dir)


def save_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    vocab_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
) -> Path:
    """``save_hf_directory`` for a full state dict (what FSDP ranks gather), with its ``ModelConfig``.

    The directory appears complete or not at all (``atomic.atomic_path``); an existing one is replaced only with
    ``overwrite`` and only when the export rewrites every file in it, never when it holds ``inputs``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors = to_hf_state_dict(state_dict)
    _check_keys_and_shapes(tensors, _expected_shapes(config), source="the state dict to export")
    vocab_files = _list_vocab_files(vocab_dir) if vocab_dir is not None else []

    with atomic_path(out_dir, inputs=[vocab_dir, *inputs], overwrite=overwrite, directory=True) as tmp:
        tmp.mkdir()
        hf_config = config.to_hf_config()
        dtype = tensors["bert.embeddings.word_embeddings.weight"].dtype
        if hasattr(hf_config, "torch_dtype") and not hasattr(type(hf_config), "dtype"):
            hf_config.torch_dtype = dtype  # transformers < 4.56: its config has no serialisable `dtype`
        else:
            hf_config.dtype = dtype
        hf_config.to_json_file(tmp / CONFIG_NAME)
        save_file(tensors, tmp / SAFETENSORS_NAME, metadata={"format": "pt"})  # HF requires the "format" entry
        for path in vocab_files:
            shutil.copy2(path, tmp / path.name)
    return out_dir


def load_hf_directory(
    path: str | os.PathLike[str], *, dtype: torch.dtype | None = torch.float32, fused_qkv: bool = False
) -> GeneformerForMaskedLM:
    """Load any HF ``BertForMaskedLM`` directory (ours, or e.g. a public Geneformer checkpoint).

    Weights come from ``model.safetensors`` (or its sharded index) when present, else from ``pytorch_model.bin``
    (or its index) read with ``torch.load(weights_only=True)``, which cannot run code from the file. Key sets and
    shapes must match exactly (apart from ``TIED_KEYS``, which must equal their targets, and
    ``IGNORED_IMPORT_KEYS``); otherwise a ``ValueError`` lists every mismatch.

    Args:
        path: The directory.
        dtype: Parameter dtype of the returned model; None keeps the checkpoint's dtype.
        fused_qkv: Build the fused-QKV layout (``ModelConfig.fused_qkv``): each layer's query, key and value
            weights are concatenated into its ``qkv`` weight.

    Returns:
        The model, in eval mode (as ``from_pretrained``); call ``.train()`` to continue pretraining.
    """
    from transformers import BertConfig

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        msg = f"{path} has no {CONFIG_NAME}; expected a Hugging Face save_pretrained directory"
        raise FileNotFoundError(msg)
    cfg = ModelConfig.from_hf_config(BertConfig.from_json_file(path / CONFIG_NAME))
    tensors = _read_weights(path)

    ignored = sorted(k for k in tensors if k in IGNORED_IMPORT_KEYS)
    if ignored:
        log.warning("Ignoring %d checkpoint keys this model does not use: %s", len(ignored), ignored)
    for alias, target in TIED_KEYS.items():
        if alias in tensors and target in tensors and not torch.equal(tensors[alias], tensors[target]):
            msg = (
                f"{path}: {alias} differs from {target}, i.e. the decoder is not tied; "
                "a Geneformer BERT always ties it, so this checkpoint cannot be loaded"
            )
            raise ValueError(msg)
    tensors = {k: v for k, v in tensors.items() if k not in IGNORED_IMPORT_KEYS and k not in TIED_KEYS}
    _check_keys_and_shapes(tensors, _expected_shapes(cfg), source=str(path))

    cfg.fused_qkv = fused_qkv
    with torch.device("meta"):
        model = GeneformerForMaskedLM(cfg)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if fused_qkv:
        tensors = fuse_qkv(tensors)
    for alias, target in TIED_KEYS.items():
        tensors[alias] = tensors[target]
    model.load_state_dict(tensors, strict=True, assign=True)  # no copy, no init of a throw-away model
    model.tie_weights()  # assign=True wrapped each alias in its own Parameter
    return model.eval()


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GeneformerForMaskedLM(cfg)
    return {k: tuple(v.shape) for k, v in _hf_items(model.state_dict())}


def _check_keys_and_shapes(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], *, source: str
) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{k}: {tuple(tensors[k].shape)} != expected {expected[k]}"
        for k in sorted(set(tensors) & set(expected))
        if tuple(tensors[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"{source} does not match the Geneformer BERT built from its config"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if items:
                parts.append(f"{len(items)} {title}: {_preview(items)}")
        msg = "; ".join(parts)
        raise ValueError(msg)


def _preview(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    def torch_load(file: Path) -> dict[str, torch.Tensor]:
        return torch.load(file, map_location="cpu", weights_only=True)

    for name, reader in ((SAFETENSORS_NAME, load_file), (PYTORCH_NAME, torch_load)):
        if (path / name).is_file():
            return dict(reader(path / name))
    for index_name, reader in ((SAFETENSORS_INDEX_NAME, load_file), (PYTORCH_INDEX_NAME, torch_load)):
        if (path / index_name).is_file():
            weight_map: dict[str, str] = json.loads((path / index_name).read_text())["weight_map"]
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(reader(path / shard))
            return tensors
    present = sorted(p.name for p in path.iterdir())
    msg = f"{path} has no weights: expected {SAFETENSORS_NAME}, {PYTORCH_NAME} or a sharded index; found {present}"
    raise FileNotFoundError(msg)


def _list_vocab_files(vocab_dir: str | os.PathLike[str]) -> list[Path]:
    vocab_dir = Path(vocab_dir)
    if not vocab_dir.is_dir():
        msg = f"vocab_dir {vocab_dir} is not a directory"
        raise ValueError(msg)
    files = sorted(p for p in vocab_dir.iterdir() if p.is_file())
    clashes = [p.name for p in files if p.name in (CONFIG_NAME, SAFETENSORS_NAME)]
    if clashes:
        msg = f"vocab_dir {vocab_dir} contains {clashes}, which would overwrite the exported model files"
        raise ValueError(msg)
    return files
