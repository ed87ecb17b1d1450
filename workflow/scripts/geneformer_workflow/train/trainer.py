"""The training loop: build once, then step, log, validate and checkpoint until ``max_steps``.

Every optimizer step trains on one global batch (see :mod:`.sampler`). The loss is the sum of
the masked-token cross-entropies of the global batch divided by its number of masked tokens;
each rank scales its micro-batch losses by ``world_size / global_masked`` so that the data-
parallel gradient average of FSDP2/DDP yields exactly that, whatever the world size. The
global masked-token count (and the stop flag, and the token counters) are summed across ranks
in one small all-reduce at the start of each step.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..atomic import write_text_atomic
from ..model import (
    TORCH_PRIMITIVES,
    GeneformerForMaskedLM,
    MaskedLMOutput,
    ModelConfig,
    Primitives,
    compile_encoder_layers,
    fp8_autocast_context,
    require_te,
    resolve_fp8_recipe,
    te_primitives,
)
from ..run_dir import CONFIG_FILE
from .backends import ModelBuild, resolve_backend
from .checkpoint import (
    FINAL_FILE,
    MODEL_CONFIG_FILE,
    AppState,
    TrainState,
    check_complete,
    latest_checkpoint,
    load_checkpoint,
    read_json,
    remove_partial_checkpoints,
    save_checkpoint,
    step_dirs,
    write_json_atomic,
)
from .collate import Batch
from .config import data_settings, model_fields, to_container
from .data import load_training_data
from .distributed import Runtime, all_reduce_sum, barrier
from .fp8_state import Fp8ScalingState
from .init_from import init_from
from .masking import IGNORE_INDEX
from .metrics import MetricsLogger, memory_metrics, model_flops, peak_flops, throughput_metrics, truncate_metrics
from .optim import build_optimizer, build_scheduler
from .parallel import resolve_precision
from .prefetch import BatchPrefetcher
from .profiling import StepProfiler
from .sampler import DATA_ORDER_VERSION, BatchLayout
from .signals import StopRequest
from .vocab import load_vocab

log = logging.getLogger(__name__)

# First line of run_dir/config.yaml: marks the file as this tool's (it is replaced at each start of the run).
RUN_CONFIG_HEADER = "# gfw train: the resolved config of the latest start of this run (rewritten at each start)\n"


class CheckpointMismatchError(ValueError):
    """The newest checkpoint belongs to a run on another vocabulary or corpus; the message says how to start over."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the steps and the checkpoint kept."""


DROPOUT_STREAM = 2  # RNG stream of dropout (masks use 0 and 1)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the dropout RNG for one rank and step: no RNG state needs saving for an exact resume."""
    return int(np.random.SeedSequence([seed, DROPOUT_STREAM, step, rank]).generate_state(1)[0])


def check_te_support(cfg: DictConfig) -> None:
    """Refuse Transformer Engine / FP8 where they cannot run, naming the key."""
    if cfg.model.use_te:
        require_te("model.use_te")
    if cfg.fp8.enabled:
        require_te("fp8.enabled")


class Trainer:
    """Owns the model, optimizer, data and loggers of one run on one rank."""

    def __init__(self, cfg: DictConfig, runtime: Runtime) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.run_dir = Path(cfg.run_dir).resolve()
        self.seed = int(cfg.seed)
        self.max_steps = int(cfg.training.max_steps)
        check_te_support(cfg)
        self.vocab = load_vocab(cfg.data.vocab_dir)
        self.backend = resolve_backend(cfg.backend.name, runtime)
        self.compute_dtype = resolve_precision(cfg.training.precision, runtime.device)
        # None (after one warning) on a GPU without FP8 tensor cores: training then stays bf16.
        self.fp8_recipe = None
        if cfg.fp8.enabled:
            self.fp8_recipe = resolve_fp8_recipe(
                cfg.fp8.recipe,
                runtime.device,
                fp8_format=cfg.fp8.format,
                recipe_kwargs=to_container(cfg.fp8.recipe_kwargs),
            )
        self.layout = BatchLayout(
            micro_batch_size=int(cfg.data.micro_batch_size),
            world_size=runtime.dist.world_size,
            grad_accum=int(cfg.training.grad_accum_steps),
        )
        self.data = load_training_data(data_settings(cfg), self.vocab, runtime, layout=self.layout, seed=self.seed)
        self.prefetcher = BatchPrefetcher(
            self.data.train_micro_batches,
            enabled=bool(cfg.data.prefetch),
            pin_memory=runtime.device.type == "cuda",
            end_step=self.max_steps,
        )
        self.model_config = ModelConfig(
            vocab_size=self.vocab.size, pad_token_id=self.vocab.pad_id, **model_fields(cfg)
        )
        self.model, self.optimizer = self._build_model_and_optimizer()
        self.peak_flops = self._peak_flops()
        self._model_shape = self.model_config.to_dict()  # for model_flops
        # After wrapping: FSDP2 swaps parameters for DTensors and megatron-fsdp replaces the optimizer.
        self.scheduler = build_scheduler(self.optimizer, **to_container(cfg.scheduler))
        self.state = TrainState()
        fp8_state = Fp8ScalingState(self.model, self.fp8_recipe) if self.fp8_recipe is not None else None
        self.app = AppState(
            self.model, self.optimizer, self.scheduler, self.state, backend=self.backend, fp8=fp8_state
        )
        self.stop = StopRequest()
        self.profiler = StepProfiler(
            cfg.logging.get("profile_steps"), self.run_dir / "profile", runtime.device, runtime.dist.rank
        )
        self.metrics: MetricsLogger | None = None
        self.last_train_loss: float | None = None
        self.last_validation: dict[str, float] = {}
        self._reset_interval()

    # ------------------------------------------------------------------ setup
    def _initial_model(self, prims: Primitives) -> GeneformerForMaskedLM:
        """The seeded initial weights (or ``model.init_from``'s), on CPU; the same on every rank that builds it."""
        torch.manual_seed(self.seed)
        model = GeneformerForMaskedLM(self.model_config, prims)
        if self.cfg.model.get("init_from"):
            init_from(model, self.model_config, self.cfg.model.init_from)
        return self._compiled(model)

    def _empty_model(self, prims: Primitives) -> GeneformerForMaskedLM:
        """The architecture on the meta device, for a backend that shards it and then loads the weights."""
        return self._compiled(GeneformerForMaskedLM(self.model_config, prims))

    def _compiled(self, model: GeneformerForMaskedLM) -> GeneformerForMaskedLM:
        """``model.compile``: each layer compiled in place, before any wrapping (torchtitan's order: compile, then
        ``fully_shard``); compilation itself happens at the first forward."""
        if self.cfg.model.get("compile"):
            compile_encoder_layers(model, backend=str(self.cfg.model.compile_backend))
        return model

    def _build_model_and_optimizer(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        prims = te_primitives() if self.cfg.model.use_te else TORCH_PRIMITIVES
        opt_kwargs = {
            "lr": float(self.cfg.optimizer.lr),
            "weight_decay": float(self.cfg.optimizer.weight_decay),
            "adamw_kwargs": to_container(self.cfg.optimizer.adamw_kwargs),
        }
        key = self.backend.kwargs_key
        build = ModelBuild(
            initial_model=functools.partial(self._initial_model, prims),
            empty_model=functools.partial(self._empty_model, prims),
            build_optimizer=functools.partial(build_optimizer, **opt_kwargs),
            runtime=self.runtime,
            compute_dtype=self.compute_dtype,
            kwargs=to_container(self.cfg.backend[key]) if key else {},
        )
        return self.backend.build(build)

    def _peak_flops(self) -> float | None:
        """Peak FLOP/s of one device for ``train/mfu`` (warns once on a GPU whose peak is unknown)."""
        peak = peak_flops(self.runtime.device, self.cfg.logging.get("peak_tflops"))
        if peak is None and self.runtime.device.type == "cuda" and self.runtime.dist.is_main:
            log.warning("no peak FLOP/s known for this GPU, so no train/mfu metric; set logging.peak_tflops")
        return peak

    # ------------------------------------------------------------------ main loop
    def train(self) -> float:
        """Resume if possible, train to ``max_steps``, validate, checkpoint; returns the last train loss."""
        self._resume()
        self._write_run_config()
        self.metrics = self._start_metrics()
        self._reset_interval()  # the first train/step_time excludes start-up
        log_every, eval_every = int(self.cfg.logging.log_every), int(self.cfg.logging.eval_every)
        save_every = int(self.cfg.checkpoint.save_every)
        while self.state.step < self.max_steps:
            self.profiler.before_step(self.state.step + 1)
            if not self.train_step():
                if self.runtime.dist.is_main:
                    log.warning("stop signal: saving a checkpoint at step %d and exiting", self.state.step)
                self.save()
                return self._loss_or_nan()
            step, last = self.state.step, self.state.step == self.max_steps
            self.profiler.after_step(step)
            if step % log_every == 0 or last:
                self.log_train()
            if eval_every > 0 and step % eval_every == 0 and not last:
                self.evaluate()
            if step % save_every == 0 and not last:
                self.save()
        self.finish()
        return self._loss_or_nan()

    def train_step(self) -> bool:
        """One optimizer step on this rank's micro-batches; False (and no update) when a stop was requested."""
        step, rank = self.state.step, self.runtime.dist.rank
        epoch, batches = self.prefetcher.get(step, rank)
        local = [sum(b.n_masked for b in batches), float(self.stop.requested)]
        local += [sum(b.n_tokens for b in batches), sum(b.n_padded_tokens for b in batches)]
        local += [sum(self._batch_flops(b) for b in batches)]
        masked, stop, tokens, padded, flops = all_reduce_sum(local, self.runtime)
        if stop > 0:
            return False
        torch.manual_seed(step_seed(self.seed, step, rank))
        self.model.train()
        scale = self.runtime.dist.world_size / max(masked, 1.0)  # undo the ranks' gradient averaging
        for i, batch in enumerate(batches):
            batch = batch.to(self.runtime.device)
            with self.backend.gradient_sync(self.model, sync=i == len(batches) - 1):
                out = self._forward(batch)
                ce_sum = out.loss * out.num_masked  # the model's loss is the mean over this micro-batch
                (ce_sum * scale).backward()
            self._loss_sum += ce_sum.detach().double()
        self._grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step, self.state.epoch = step + 1, epoch
        self.state.tokens_seen += int(tokens)
        self.state.cells_seen += self.layout.global_batch_size
        self._masked += masked
        self._tokens += tokens
        self._padded += padded
        self._flops += flops
        self._steps += 1
        return True

    def _forward(self, batch: Batch) -> MaskedLMOutput:
        """One micro-batch forward under bf16 autocast and, when on, Transformer Engine's FP8 autocast."""
        amax_group = torch.distributed.group.WORLD if self.runtime.has_process_group else None
        fp8 = fp8_autocast_context(
            self.fp8_recipe is not None, self.fp8_recipe, self.runtime.device, amax_reduction_group=amax_group
        )
        with self.backend.autocast(self.runtime.device, self.compute_dtype), fp8:
            return self.model(batch.input_ids, batch.attention_mask, batch.labels, packed=batch.packed)

    def _batch_flops(self, batch: Batch) -> float:
        """Model FLOPs of one micro-batch's forward and backward (host integers only, no device sync)."""
        return model_flops(
            self._model_shape,
            n_tokens=batch.n_tokens,
            sum_sq_lengths=batch.sum_sq_lengths,
            n_masked=batch.n_masked,
        )

    def _clip_gradients(self) -> torch.Tensor | None:
        max_norm = self.cfg.training.max_grad_norm
        if max_norm is None:
            return None
        # Works on FSDP2's DTensor gradients (the norm is reduced over shards). See docs/training.md for megatron-fsdp.
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(max_norm))

    # ------------------------------------------------------------------ metrics and validation
    def _reset_interval(self) -> None:
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        self._masked = self._tokens = self._padded = self._flops = 0.0
        self._steps = 0
        self._grad_norm: torch.Tensor | None = None
        self._interval_start = time.perf_counter()

    def _require_finite_loss(self) -> float:
        """The interval's loss sum over all ranks; stops the run when it is NaN or infinite.

        Called when metrics are logged and before every checkpoint, so a diverged model is never saved
        and the newest checkpoint stays the last good one (one host sync per call, not per step).
        """
        (loss_sum,) = all_reduce_sum([float(self._loss_sum)], self.runtime)
        if not math.isfinite(loss_sum):
            first = self.state.step - self._steps + 1
            latest = step_dirs(self.run_dir)
            kept = f"the last good checkpoint is {latest[-1][1]}" if latest else "no checkpoint was written"
            msg = (
                f"the training loss became {loss_sum} between steps {first} and {self.state.step}; the run stopped "
                f"and {kept}. Lower optimizer.lr, raise scheduler.warmup_steps or set training.max_grad_norm"
            )
            raise NonFiniteLossError(msg)
        return loss_sum

    def log_train(self) -> None:
        """Reduce the interval's loss across ranks and write the train/* metrics (rank 0)."""
        loss_sum = self._require_finite_loss()
        elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
        self.last_train_loss = loss_sum / max(self._masked, 1.0)
        metrics = {
            "train/loss": self.last_train_loss,
            "train/learning_rate": self.scheduler.get_last_lr()[0],
            "train/step_time": elapsed / max(self._steps, 1),
            "train/tokens_per_second": self._padded / elapsed,
            "train/unpadded_tokens_per_second": self._tokens / elapsed,
            "train/unpadded_tokens_per_second_per_rank": self._tokens / elapsed / self.runtime.dist.world_size,
            "train/tokens_seen": self.state.tokens_seen,
            "train/epoch": self.state.epoch,
            **memory_metrics(self.runtime.device),
            **throughput_metrics(self._flops, elapsed, self.runtime.dist.world_size, self.peak_flops),
        }
        if self._grad_norm is not None:
            norm = self._grad_norm
            metrics["train/grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.metrics.log(self.state.step, metrics)
        self._reset_interval()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and accuracy on the fixed validation masks (all ranks take part)."""
        if len(self.data.validation) == 0:
            return {}
        started = time.perf_counter()
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.runtime.device)  # CE sum, correct, masked
        for indices, counts in self.data.validation_plan(
            self.seed, self.runtime.dist.world_size, self.runtime.dist.rank
        ):
            batch = self.data.validation_batch(indices).to(self.runtime.device)
            out = self._forward(batch)
            if counts:  # filler batches only keep FSDP's collectives in step
                targets = batch.labels[batch.labels != IGNORE_INDEX]
                correct = (out.logits.argmax(dim=-1) == targets).sum()
                totals += torch.stack(
                    [out.loss.double() * out.num_masked, correct.double(), totals.new_tensor(out.num_masked)]
                )
        ce, correct, masked = all_reduce_sum(totals.tolist(), self.runtime)
        self.last_validation = {
            "validation/loss": ce / max(masked, 1.0),
            "validation/accuracy": correct / max(masked, 1.0),
            "validation/masked_tokens": masked,
            "validation/time": time.perf_counter() - started,
        }
        self.metrics.log(self.state.step, self.last_validation)
        self._interval_start += time.perf_counter() - started  # keep validation out of train/step_time
        return self.last_validation

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_meta(self) -> dict[str, Any]:
        epoch, index = self.data.sampler.position(self.state.step)
        return {
            "data_position": {"next_epoch": epoch, "next_batch_in_epoch": index},
            "batches_per_epoch": self.data.sampler.batches_per_epoch,
            "global_batch_size": self.layout.global_batch_size,
            "micro_batch_size": self.layout.micro_batch_size,
            "grad_accum_steps": self.layout.grad_accum,
            "world_size": self.runtime.dist.world_size,
            "seed": self.seed,
            "backend": self.backend.name,
            "vocab_dir": str(Path(self.cfg.data.vocab_dir).resolve()),
            "token_dictionary_sha256": self.vocab.sha256,
            "corpus_sha256": self.data.content_sha256,
            "data_order": DATA_ORDER_VERSION,
            "train_cells": len(self.data.train),
            "window_batches": self.data.sampler.window_batches,
            "train_loss": self.last_train_loss,
        }

    def save(self) -> Path:
        """Checkpoint the current step (collective); refuses to save a diverged (NaN/inf loss) model."""
        self._require_finite_loss()
        started = time.perf_counter()
        path = save_checkpoint(
            self.run_dir,
            self.app,
            self.runtime,
            meta=self._checkpoint_meta(),
            model_config=self.model_config.to_dict(),
            keep_last=int(self.cfg.checkpoint.keep_last),
        )
        self._interval_start += time.perf_counter() - started
        log.info("checkpoint %s saved in %.1f s", path, time.perf_counter() - started)
        return path

    def _resume(self) -> None:
        """Load the newest checkpoint, if any, and drop outputs of the interrupted attempt."""
        if self.runtime.dist.is_main:
            remove_partial_checkpoints(self.run_dir)
            (self.run_dir / FINAL_FILE).unlink(missing_ok=True)  # written again when this run completes
        barrier(self.runtime)
        path = latest_checkpoint(self.run_dir)
        if path is None:
            if self.runtime.dist.is_main:
                truncate_metrics(self.run_dir, 0)  # lines of an attempt killed before its first checkpoint
            return
        if not self.cfg.checkpoint.resume:
            msg = f"{path} exists but checkpoint.resume=false; set checkpoint.resume=true, or use a new run_dir"
            raise ValueError(msg)
        meta = check_complete(path)
        self._check_compatible(path, meta)
        load_checkpoint(path, self.app)
        self.last_train_loss = meta.get("train_loss")
        if self.runtime.dist.is_main:
            truncate_metrics(self.run_dir, self.state.step)
            log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)
        self._reset_interval()

    def _check_compatible(self, path: Path, meta: dict[str, Any]) -> None:
        """Resume only the same run: same vocabulary and corpus content, seed, global batch and window."""
        self._check_same_data(path, meta)
        expected = {
            "seed": ("seed", self.seed),
            "global_batch_size": (
                "data.micro_batch_size x world size x training.grad_accum_steps",
                self.layout.global_batch_size,
            ),
            "train_cells": ("data.corpus", len(self.data.train)),
            "window_batches": ("data.window_batches", self.data.sampler.window_batches),
        }
        for key, (config_key, value) in expected.items():
            if key == "window_batches" and key not in meta:
                continue  # checkpoints written before the key existed
            if meta.get(key) != value:
                msg = (
                    f"cannot resume from {path}: it was trained with {key}={meta.get(key)} but this run has {value}; "
                    f"keep {config_key} as it was, or start a new run_dir"
                )
                raise ValueError(msg)
        saved_fused = bool(read_json(path / MODEL_CONFIG_FILE).get("fused_qkv", False))
        if saved_fused != self.model_config.fused_qkv:
            msg = (
                f"cannot resume from {path}: its weights are in the fused_qkv={str(saved_fused).lower()} layout but "
                f"this run has model.fused_qkv={str(self.model_config.fused_qkv).lower()}; keep model.fused_qkv as "
                "it was, or start a new run_dir with model.init_from pointing at this run (which converts the layout)"
            )
            raise ValueError(msg)

    def _check_same_data(self, path: Path, meta: dict[str, Any]) -> None:
        """A checkpoint trained on another vocabulary or other cells is never continued (issue 15).

        Checkpoints older than these fields cannot be checked: they resume with a warning.
        """
        start_over = (
            f"To train on the new data from scratch, move the old run away (e.g. `mv {self.run_dir} "
            f"{self.run_dir}.old`) or set another run_dir; to continue the old run, restore the data it was "
            "trained on"
        )
        order = meta.get("data_order", 1)  # checkpoints without the key were written with data order 1
        if order != DATA_ORDER_VERSION:
            msg = (
                f"cannot resume from {path}: it was trained with data order version {order} (an older gfw) and this "
                f"version plans batches with version {DATA_ORDER_VERSION}, so the run would not continue on the "
                f"batches it was heading for. {start_over}; or finish the old run with the gfw version that started it"
            )
            raise CheckpointMismatchError(msg)
        vocab, corpus = meta.get("token_dictionary_sha256"), meta.get("corpus_sha256")
        changes = {
            "the vocabulary changed since it was trained (token dictionary checksum {then}… then, {now}… now in "
            f"data.vocab_dir={self.cfg.data.vocab_dir}; e.g. tokenize.preset or vocabulary.* changed), so every "
            "checkpoint of this run is for another vocabulary": (vocab, self.vocab.sha256),
            "it was trained on other data (corpus content checksum {then}… then, {now}… now: the cells, their "
            "counts, the gene medians or the QC changed)": (corpus, self.data.content_sha256),
        }
        for problem, (then, now) in changes.items():
            if then is not None and then != now:
                problem = problem.replace("{then}", then[:12]).replace("{now}", now[:12])  # no format(): paths
                msg = f"cannot resume from {path}: {problem}. {start_over}"
                raise CheckpointMismatchError(msg)
        if vocab is None or corpus is None:
            log.warning(
                "%s predates corpus and vocabulary checksums: cannot check that it was trained on this data", path
            )

    def finish(self) -> None:
        """Final validation, final checkpoint and ``final.json``."""
        self.evaluate()
        path = self.save()
        if self.runtime.dist.is_main:
            payload = {
                "checkpoint": str(path.relative_to(self.run_dir)),
                "step": self.state.step,
                "train_loss": self.last_train_loss,
                "validation_loss": self.last_validation.get("validation/loss"),
                "validation_accuracy": self.last_validation.get("validation/accuracy"),
            }
            write_json_atomic(self.run_dir / FINAL_FILE, payload)
        barrier(self.runtime)

    def _write_run_config(self) -> None:
        """``run_dir/config.yaml``: the resolved config of this start of the run (the report shows this file).

        Written after the resume checks, so a refused resume leaves the file of the run it refused to continue. A
        ``config.yaml`` that ``gfw train`` did not write (no :data:`RUN_CONFIG_HEADER`) is never replaced: every rank
        checks before rank 0 writes, so all of them stop with the same message.
        """
        path = self.run_dir / CONFIG_FILE
        if path.is_file() and not path.read_text().startswith(RUN_CONFIG_HEADER):
            msg = (
                f"{path} exists and was not written by gfw train; run_dir={self.run_dir} holds other files: "
                "choose another run_dir"
            )
            raise ValueError(msg)
        if self.runtime.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, RUN_CONFIG_HEADER + OmegaConf.to_yaml(self.cfg, resolve=True))

    def _start_metrics(self) -> MetricsLogger:
        return MetricsLogger(
            self.run_dir,
            self.runtime,
            wandb_cfg=to_container(self.cfg.wandb),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            console=bool(self.cfg.logging.console),
        )

    def _loss_or_nan(self) -> float:
        return float("nan") if self.last_train_loss is None else float(self.last_train_loss)

    def close(self) -> None:
        """Close loggers and restore signal handlers (always called, also on errors)."""
        if self.metrics is not None:
            self.metrics.close()
        self.prefetcher.close()
        self.stop.restore()
