"""Composing the Hydra config and checking it in one place.

Every rank composes the same config with Hydra's compose API (no output directory, no
``chdir``), so ``torchrun`` workers agree without passing ``hydra.run.dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from .data import DataSettings

# <repo>/workflow/scripts/geneformer_workflow/train/config.py -> <repo>/config/train
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[4] / "config" / "train"
MODEL_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "initializer_range",
    "type_vocab_size",
    "gradient_checkpointing",
)


def compose_config(
    config_name: str = "sanity", overrides: list[str] | None = None, config_dir: Path | None = None
) -> DictConfig:
    """Compose ``<config_dir>/<config_name>.yaml`` with Hydra ``key=value`` overrides.

    Example:
        >>> cfg = compose_config("sanity", ["run_dir=/tmp/run", "data.corpus=[a.parquet]", "data.vocab_dir=v"])
        >>> cfg.model.num_hidden_layers, cfg.data.max_length
        (2, 2048)
    """
    directory = Path(config_dir) if config_dir is not None else DEFAULT_CONFIG_DIR
    if not (directory / f"{config_name}.yaml").is_file():
        available = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        msg = f"no training config {config_name!r} in {directory}; pass --config-dir, or one of {available}"
        raise ValueError(msg)
    with initialize_config_dir(config_dir=str(directory.resolve()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def _positive(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        msg = f"{key}={value!r} must be a positive integer"
        raise ValueError(msg)


def validate_config(cfg: DictConfig) -> None:
    """Check mandatory keys and cross-key rules, naming the key and the fix.

    Raises:
        ValueError: on the first problem found.
    """
    missing = _missing_keys(cfg)
    if missing:
        msg = f"mandatory config keys are unset: {missing}; pass them as overrides, e.g. {missing[0]}=..."
        raise ValueError(msg)
    for key in ("data.max_length", "data.micro_batch_size", "data.eval_micro_batch_size", "data.window_batches",
                "data.pad_to_multiple_of", "training.max_steps", "training.grad_accum_steps", "logging.log_every",
                "checkpoint.save_every"):  # fmt: skip
        _positive(cfg, key)
    if cfg.model.max_position_embeddings < cfg.data.max_length:
        msg = (
            f"model.max_position_embeddings={cfg.model.max_position_embeddings} is smaller than "
            f"data.max_length={cfg.data.max_length}; raise model.max_position_embeddings or lower data.max_length"
        )
        raise ValueError(msg)
    if cfg.fp8.enabled and not cfg.model.use_te:
        msg = "fp8.enabled=true needs Transformer Engine layers; set model.use_te=true or fp8.enabled=false"
        raise ValueError(msg)
    if cfg.training.max_grad_norm is not None and cfg.training.max_grad_norm <= 0:
        msg = f"training.max_grad_norm={cfg.training.max_grad_norm} must be > 0, or null to turn clipping off"
        raise ValueError(msg)
    peak = cfg.logging.get("peak_tflops")
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak <= 0):
        msg = f"logging.peak_tflops={peak!r} must be a positive number (TFLOP/s), or null to look it up"
        raise ValueError(msg)
    if cfg.wandb.mode not in {"online", "offline", "disabled"}:
        msg = f"wandb.mode={cfg.wandb.mode!r} is not one of online, offline, disabled"
        raise ValueError(msg)


def _missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every ``???`` value."""
    keys = []
    for key in cfg.keys():
        if OmegaConf.is_missing(cfg, key):
            keys.append(f"{prefix}{key}")
        elif isinstance(cfg._get_node(key), DictConfig):
            keys.extend(_missing_keys(cfg[key], f"{prefix}{key}."))
    return keys


def data_settings(cfg: DictConfig) -> DataSettings:
    """The typed ``data`` block."""
    corpus = cfg.data.corpus
    corpus = (corpus,) if isinstance(corpus, str) else tuple(str(c) for c in corpus)
    return DataSettings(
        corpus=corpus,
        cache_dir=str(cfg.data.cache_dir),
        train_split=str(cfg.data.train_split),
        validation_split=str(cfg.data.validation_split),
        max_length=int(cfg.data.max_length),
        micro_batch_size=int(cfg.data.micro_batch_size),
        eval_micro_batch_size=int(cfg.data.eval_micro_batch_size),
        max_validation_cells=int(cfg.data.max_validation_cells),
        window_batches=int(cfg.data.window_batches),
        pad_to_multiple_of=int(cfg.data.pad_to_multiple_of),
        mlm_probability=float(cfg.data.mlm_probability),
        mask_replace_prob=float(cfg.data.mask_replace_prob),
        random_replace_prob=float(cfg.data.random_replace_prob),
    )


def model_fields(cfg: DictConfig) -> dict[str, Any]:
    """``ModelConfig`` fields from the ``model`` block (without vocab_size / pad id, which come from the vocab)."""
    return {key: cfg.model[key] for key in MODEL_KEYS}


def to_container(node: Any) -> Any:
    """A plain, resolved Python object from an OmegaConf node (for ``*_kwargs`` blocks)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
