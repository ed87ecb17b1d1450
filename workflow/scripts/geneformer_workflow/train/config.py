"""Composing the Hydra config and checking it in one place.

Every rank composes the same config with Hydra's compose API (no output directory, no
``chdir``), so ``torchrun`` workers agree without passing ``hydra.run.dir``.

Two checks run at start, before any data is read or a process group is started:
:func:`validate_config` (the config alone: mandatory keys, types, ranges, impossible
combinations) and :func:`check_environment` (the config against this job: CUDA devices,
``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` from ``torchrun``, and the global batch of the checkpoint
a run resumes from). Each error names the key and the fix.

Output paths: the trainer derives every output from ``run_dir`` with fixed names
(``checkpoints/step_<n>``, ``metrics.jsonl``, ``final.json``, ``wandb/``), so no config value
can send one elsewhere; only ``data.cache_dir`` (default ``${run_dir}/cache``) may point
outside, on purpose, so that runs share a training store built from ``data.corpus``. Inputs (``data.store``,
``data.corpus``,
``data.vocab_dir``, ``model.init_from``) may be anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ..model.config import PACKED_ATTENTION_KERNELS
from ..tokenize.vocab import TOKENIZER_CONFIG
from .backends import BACKEND_CHOICES, BACKENDS, single_process_error
from .checkpoint import META_FILE, CheckpointError, latest_checkpoint, read_json
from .data import DataSettings
from .distributed import DistributedConfig
from .optim import SCHEDULES
from .parallel import PRECISIONS

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
    "fused_qkv",
    "packed_attention",
)
COMPILE_BACKENDS = ("none", "ddp", "fsdp2", "auto")  # model.compile is tested with these (not with mfsdp)
DEVICES = ("auto", "cpu", "cuda")
FP8_MULTIPLE = 16  # FP8 GEMMs need every dimension, tokens included, to be a multiple of 16


def compose_config(
    config_name: str = "sanity", overrides: list[str] | None = None, config_dir: Path | None = None
) -> DictConfig:
    """Compose ``<config_dir>/<config_name>.yaml`` with Hydra ``key=value`` overrides.

    Example:
        >>> cfg = compose_config("sanity", ["run_dir=/tmp/run", "data.corpus=[a.parquet]", "data.max_length=2048"])
        >>> cfg.model.num_hidden_layers, cfg.data.max_length, cfg.model.max_position_embeddings
        (2, 2048, 2048)
    """
    directory = Path(config_dir) if config_dir is not None else DEFAULT_CONFIG_DIR
    if not (directory / f"{config_name}.yaml").is_file():
        available = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        msg = f"no training config {config_name!r} in {directory}; pass --config-dir, or one of {available}"
        raise ValueError(msg)
    with initialize_config_dir(config_dir=str(directory.resolve()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    resolve_max_length(cfg)
    return cfg


def resolve_max_length(cfg: DictConfig) -> None:
    """``data.max_length: null`` (the default) becomes the vocabulary's ``model_max_length``.

    The vocabulary directory records its preset's length in ``tokenizer_config.json`` (``gfw vocab``), so the
    tokens per cell have one home. Left null when the directory is unset or has no such file:
    :func:`validate_config` then names the fix.
    """
    if OmegaConf.select(cfg, "data.max_length") is not None or OmegaConf.is_missing(cfg.data, "vocab_dir"):
        return
    path = Path(str(cfg.data.vocab_dir)) / TOKENIZER_CONFIG
    try:
        value = json.loads(path.read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        cfg.data.max_length = value


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
    keys = ("data.max_length",) if cfg.data.max_length is not None else ()  # null: checked last
    for key in (*keys, "data.micro_batch_size", "data.eval_micro_batch_size", "data.window_batches",
                "data.pad_to_multiple_of", "training.max_steps", "training.grad_accum_steps", "logging.log_every",
                "checkpoint.save_every"):  # fmt: skip
        _positive(cfg, key)
    if cfg.data.max_length is not None and cfg.model.max_position_embeddings < cfg.data.max_length:
        msg = (
            f"model.max_position_embeddings={cfg.model.max_position_embeddings} is smaller than "
            f"data.max_length={cfg.data.max_length}; raise model.max_position_embeddings or lower data.max_length"
        )
        raise ValueError(msg)
    _check_speed_options(cfg)
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
    _check_choices(cfg)
    _check_data_source(cfg)
    _check_output_paths(cfg)
    _check_model_shape(cfg)
    _check_masking(cfg)
    if cfg.training.device == "cpu":
        _check_gpu_features(cfg, "training.device=cpu")
    if cfg.fp8.enabled and cfg.data.pad_to_multiple_of % FP8_MULTIPLE:
        msg = (
            f"fp8.enabled=true needs data.pad_to_multiple_of to be a multiple of {FP8_MULTIPLE} (FP8 GEMMs), "
            f"got {cfg.data.pad_to_multiple_of}; set data.pad_to_multiple_of={FP8_MULTIPLE}"
        )
        raise ValueError(msg)

    if cfg.data.max_length is None:
        path = Path(str(cfg.data.vocab_dir)) / TOKENIZER_CONFIG
        msg = (
            f"data.max_length is null (= the vocabulary's model_max_length) but {path} does not give one; set "
            "data.max_length (Geneformer v1: 2048, v2: 4096) or point data.vocab_dir at a `gfw vocab` directory"
        )
        raise ValueError(msg)


def _check_speed_options(cfg: DictConfig) -> None:
    """``model.fused_qkv``, ``model.compile`` (booleans) and ``model.packed_attention``: PyTorch layers only,
    ``compile`` not with mfsdp."""
    for key in ("model.fused_qkv", "model.compile"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            msg = f"{key}={value!r} must be true or false"
            raise ValueError(msg)
        if value and cfg.model.use_te:
            msg = (
                f"{key}=true applies to the PyTorch layers only, not to Transformer Engine layers "
                f"(model.use_te=true); set {key}=false or model.use_te=false"
            )
            raise ValueError(msg)
    kernel = OmegaConf.select(cfg, "model.packed_attention")
    if kernel not in PACKED_ATTENTION_KERNELS:
        msg = f"model.packed_attention={kernel!r} is not one of {', '.join(PACKED_ATTENTION_KERNELS)}"
        raise ValueError(msg)
    if kernel != "auto" and cfg.model.use_te:
        msg = (
            f"model.packed_attention={kernel} applies to the PyTorch layers only; Transformer Engine layers "
            "(model.use_te=true) attend packed batches with their own thd kernel: set model.packed_attention=auto"
        )
        raise ValueError(msg)
    if cfg.model.compile:
        _check_compile_backend(str(cfg.model.compile_backend))
    if cfg.model.compile and cfg.backend.name not in COMPILE_BACKENDS:
        msg = (
            f"model.compile=true is not supported with backend.name={cfg.backend.name}; use one of "
            f"{', '.join(COMPILE_BACKENDS)}, or set model.compile=false"
        )
        raise ValueError(msg)


def _check_compile_backend(name: str) -> None:
    """``model.compile_backend`` must be a ``torch.compile`` backend (checked only with ``model.compile=true``)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        msg = f"model.compile_backend={name!r} is not a torch.compile backend; choose one of {', '.join(known)}"
        raise ValueError(msg)


def _check_choices(cfg: DictConfig) -> None:
    """Keys with a fixed set of values (checked here too, so that a typo fails before the data is read)."""
    choices = {
        "backend.name": BACKEND_CHOICES,
        "training.device": DEVICES,
        "training.precision": PRECISIONS,
        "scheduler.name": SCHEDULES,
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            msg = f"{key}={value!r} is not one of {', '.join(allowed)}"
            raise ValueError(msg)


def _check_data_source(cfg: DictConfig) -> None:
    """Exactly one of ``data.store`` (a built training store) and ``data.corpus`` (parquet files) is set."""
    store, corpus = cfg.data.get("store"), cfg.data.get("corpus")
    if (store is None) == (corpus is None or (not isinstance(corpus, str) and len(corpus) == 0)):
        problem = "both are set" if store is not None else "neither is set"
        msg = (
            f"set exactly one of data.store and data.corpus ({problem}): data.store=STORE/store.json (built by the "
            "workflow or `gfw store build`) or data.corpus=[FILES...] (parquet files, dataset.json, directories)"
        )
        raise ValueError(msg)


def _check_output_paths(cfg: DictConfig) -> None:
    """``run_dir`` and ``data.cache_dir`` must name a directory: not empty (silently the current one), not ``/``."""
    for key in ("run_dir", "data.cache_dir"):
        value = str(OmegaConf.select(cfg, key)).strip()
        if not value or Path(value).resolve() == Path(Path(value).resolve().anchor):
            msg = f"{key}={value!r} must name a directory for this run's outputs (not empty, not a file system root)"
            raise ValueError(msg)


def _check_model_shape(cfg: DictConfig) -> None:
    for key in ("model.hidden_size", "model.num_hidden_layers", "model.num_attention_heads",
                "model.intermediate_size"):  # fmt: skip
        _positive(cfg, key)
    hidden, heads = cfg.model.hidden_size, cfg.model.num_attention_heads
    if hidden % heads:
        msg = (
            f"model.hidden_size={hidden} is not divisible by model.num_attention_heads={heads}; pick a number of "
            "heads that divides it"
        )
        raise ValueError(msg)
    for key in ("model.hidden_dropout_prob", "model.attention_probs_dropout_prob"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            msg = f"{key}={value!r} must be a number in [0, 1)"
            raise ValueError(msg)


def _check_masking(cfg: DictConfig) -> None:
    data = cfg.data
    if not 0.0 < data.mlm_probability < 1.0:
        msg = f"data.mlm_probability={data.mlm_probability} must be in (0, 1); Geneformer uses 0.15"
        raise ValueError(msg)
    mask, random = data.mask_replace_prob, data.random_replace_prob
    if mask < 0 or random < 0 or mask + random > 1:
        msg = (
            f"data.mask_replace_prob={mask} and data.random_replace_prob={random} must be >= 0 with a sum <= 1 "
            "(BERT uses 0.8 and 0.1)"
        )
        raise ValueError(msg)


def _check_gpu_features(cfg: DictConfig, reason: str) -> None:
    """Refuse what only runs on CUDA GPUs when the run trains on CPU; ``reason`` says why it does."""
    backend = BACKENDS.get(cfg.backend.name)
    features = [
        (cfg.fp8.enabled, "fp8.enabled=true", "needs CUDA + Transformer Engine (FP8 GEMMs)", "fp8.enabled=false"),
        (cfg.model.use_te, "model.use_te=true", "needs CUDA + Transformer Engine", "model.use_te=false"),
        (bool(backend and backend.needs_cuda), f"backend.name={cfg.backend.name}",
         backend and backend.needs_cuda, "backend.name=fsdp2"),
        (cfg.training.precision == "bf16", "training.precision=bf16", "needs a CUDA device",
         "training.precision=auto"),
    ]  # fmt: skip
    for enabled, setting, problem, fix in features:
        if enabled:
            msg = f"{setting} {problem}, but {reason}; set {fix} to train on CPU"
            raise ValueError(msg)


def check_environment(
    cfg: DictConfig, environ: Mapping[str, str] | None = None, *, cuda_devices: int | None = None
) -> None:
    """Check the config against this job, before the process group starts and before any data is read.

    Args:
        cfg: A config that passed :func:`validate_config`.
        environ: The environment (default ``os.environ``); ``torchrun`` sets ``WORLD_SIZE`` and
            ``LOCAL_WORLD_SIZE`` (processes in the job and on this node).
        cuda_devices: Visible CUDA devices (default ``torch.cuda.device_count()``).

    Raises:
        ValueError: naming the key (or variable) and the fix.
    """
    env = os.environ if environ is None else environ
    dist = DistributedConfig.from_env(env)
    gpus = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    device = cfg.training.device
    if device == "cuda" and gpus == 0:
        msg = "training.device=cuda but no CUDA device is visible; set training.device=auto or cpu"
        raise ValueError(msg)
    if device == "auto" and gpus == 0:
        _check_gpu_features(cfg, "training.device=auto and this machine has no CUDA device")
    local = int(env.get("LOCAL_WORLD_SIZE", dist.world_size))
    if device != "cpu" and gpus > 0 and local > gpus:
        msg = (
            f"LOCAL_WORLD_SIZE={local} processes on this node but only {gpus} visible CUDA devices; start one "
            "process per GPU (torchrun --nproc_per_node), or set training.device=cpu"
        )
        raise ValueError(msg)
    backend = BACKENDS.get(cfg.backend.name)
    if backend is not None and not backend.multi_process and dist.world_size > 1:
        msg = single_process_error(cfg.backend.name, dist.world_size)
        raise ValueError(msg)
    _check_resume_batch(cfg, dist.world_size)


def _check_resume_batch(cfg: DictConfig, world_size: int) -> None:
    """A resumed run must keep its global batch (``micro x world size x accumulation``) to keep its data order.

    A fresh run's global batch is that product, so it always splits evenly; resuming on another number
    of processes needs ``data.micro_batch_size x training.grad_accum_steps = global batch / WORLD_SIZE``.
    """
    latest = latest_checkpoint(Path(cfg.run_dir)) if cfg.checkpoint.resume else None
    if latest is None:
        return
    try:
        saved = int(read_json(latest / META_FILE)["global_batch_size"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return  # a broken checkpoint: the trainer reports it with the full story
    micro, accum = int(cfg.data.micro_batch_size), int(cfg.training.grad_accum_steps)
    if micro * world_size * accum == saved:
        return
    have = f"data.micro_batch_size={micro} x WORLD_SIZE={world_size} x training.grad_accum_steps={accum}"
    if saved % world_size:
        fix = f"run with a number of processes that divides {saved}"
    else:
        per_rank = saved // world_size
        new_micro = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
        fix = (
            f"set data.micro_batch_size x training.grad_accum_steps = {per_rank}, e.g. "
            f"data.micro_batch_size={new_micro} training.grad_accum_steps={per_rank // new_micro}"
        )
    msg = (
        f"cannot resume from {latest}: it was trained with global_batch_size={saved}, which {have} "
        f"= {micro * world_size * accum} does not match; {fix}, or start a new run_dir"
    )
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
    corpus = cfg.data.get("corpus") or ()
    corpus = (corpus,) if isinstance(corpus, str) else tuple(str(c) for c in corpus)
    store = cfg.data.get("store")
    return DataSettings(
        store=None if store is None else str(store),
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
        packing=bool(cfg.data.packing),
    )


def model_fields(cfg: DictConfig) -> dict[str, Any]:
    """``ModelConfig`` fields from the ``model`` block (without vocab_size / pad id, which come from the vocab)."""
    return {key: cfg.model[key] for key in MODEL_KEYS}


def to_container(node: Any) -> Any:
    """A plain, resolved Python object from an OmegaConf node (for ``*_kwargs`` blocks)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
