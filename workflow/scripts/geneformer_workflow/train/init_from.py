"""Start pretraining from existing weights: a Hugging Face / Geneformer checkpoint or one of ours.

``model.init_from`` names a ``BertForMaskedLM`` directory (``config.json`` + safetensors or
``pytorch_model.bin``, e.g. a public Geneformer model) or one of our run / ``checkpoints/step_<n>``
directories. It sets the initial weights of a fresh run only: a run that resumes from its own
checkpoints continues from those. The architecture must match the training config (the corpus must
use the checkpoint's token dictionary); a mismatch is an error naming the keys.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..model import (
    GeneformerForMaskedLM,
    ModelConfig,
    fuse_qkv,
    hf_state_dict_to_te,
    load_hf_directory,
    split_fused_qkv,
)
from ..model.config import SHAPE_FIELDS
from .checkpoint import load_checkpoint_model

log = logging.getLogger(__name__)


def load_source_model(path: str | Path) -> GeneformerForMaskedLM:
    """The model stored at ``path`` (HF directory, our run dir or step dir), on CPU in fp32."""
    path = Path(path)
    if (path / "config.json").is_file():
        return load_hf_directory(path)
    return load_checkpoint_model(path)[0]


def init_from(model: GeneformerForMaskedLM, config: ModelConfig, path: str | Path) -> None:
    """Copy the weights at ``path`` into ``model`` (before sharding), after checking the shapes agree."""
    if not Path(path).exists():
        msg = f"model.init_from={path}: no such checkpoint directory"
        raise ValueError(msg)
    source = load_source_model(path)
    different = {
        key: (getattr(source.config, key), getattr(config, key))
        for key in SHAPE_FIELDS
        if getattr(source.config, key) != getattr(config, key)
    }
    if different:
        details = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in different.items())
        msg = (
            f"model.init_from={path}: the checkpoint's architecture differs from the training config ({details}); "
            "choose the matching model size, data.max_length and the checkpoint's token dictionary"
        )
        raise ValueError(msg)
    extra_state = [key for key in model.state_dict() if key.endswith("._extra_state")]  # Transformer Engine only
    hf_names = split_fused_qkv(source.state_dict())  # a fused-QKV source (model.fused_qkv) -> HF's q, k, v
    state = hf_state_dict_to_te(hf_names, extra_state_keys=extra_state)
    model.load_state_dict(fuse_qkv(state) if config.fused_qkv else state)
    log.info("initialised the model from %s", path)
