"""One prepared check for a lent GPU machine: GPU tests, backends, bf16 throughput and MFU, 4b memory.

Sections (each runs in its own process with a time limit; a failure or a timeout is recorded and the next section
runs anyway):

==============  =================================================================================================
``environment``  torch / CUDA / device, the peak bf16 FLOP/s used for MFU, which optional packages import
``tests``        ``pytest -m gpu tests/train tests/model`` (skipped in ``--dry-run``)
``backends``     ``gfw train`` under ``torchrun`` (1 process) with backend none, fsdp2 and mfsdp (megatron-fsdp):
                 a few bf16 steps, a checkpoint, a resume; losses compared with the unwrapped model
``throughput``   bf16 forward + backward + AdamW of the 10m (12 x 2,048) and 106m (8 x 4,096) models on full-length
                 cells: tokens/s and MFU, and ``transformers.BertForMaskedLM`` (sdpa) on the same batch for
                 comparison; plus the engine's own metrics (``train/mfu``) for a 10m run on the corpus
``memory_4b``    the 4b model (2.9 B parameters) on one GPU with activation checkpointing: peak memory of forward
                 + backward at 4,096 tokens for micro-batches 1, 2, 4; batch 1 without checkpointing; one AdamW step
==============  =================================================================================================

MFU = model FLOPs per second / the device's peak dense bf16 FLOP/s, with model FLOPs from
:func:`geneformer_workflow.train.metrics.model_flops` (6 per weight and real token, plus ``12·L·H·t²`` for attention,
plus the MLM head on masked tokens; Kaplan et al. 2020 and PaLM, Chowdhery et al. 2022, Appendix B). Activation
recomputation is not counted, so MFU with checkpointing is lower than the hardware utilisation.

Results go to ``OUT/gpu_check.json``, ``OUT/gpu_check.md`` and ``OUT/gpu_check.log`` (all child output), and a
summary is printed. The exit code is 1 when a section failed or timed out.

    bash benchmarks/gpu_check.sh                       # on the GPU machine: installs carried wheels, then this
    python benchmarks/gpu_check.py --out /tmp/gpu      # GPU, all sections (about 4-6 minutes on an H100)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_dry   # CPU, tiny sizes: exercises every code path

The training corpus is ``--corpus``/``--vocab-dir``, else the demo corpus in ``results/tokenized`` with
``results/reference/vocab`` (carry them to the GPU machine), else a seeded synthetic corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))

# Section name -> its time limit in seconds on a GPU (the whole check must end within --budget-s).
SECTION_LIMITS_S = {
    "environment": 60, "tests": 120, "backends": 200, "throughput": 180, "memory_4b": 150, "packing": 200,
}  # fmt: skip
BACKENDS = ("none", "fsdp2", "mfsdp")
V1_VOCAB, V2_VOCAB = 25_426, 20_275  # Geneformer V1 (2,048 tokens) and V2 (4,096 tokens) vocabularies


class SectionSkipped(Exception):
    """Raised by a section that does not apply here (its message says why)."""


class SectionError(RuntimeError):
    """A section failure that still carries the partial results."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Context:
    """What every section needs; written as JSON by the parent and read by each section's process."""

    device: str
    tiny: bool
    workdir: str
    corpus: list[str] = field(default_factory=list)
    vocab_dir: str | None = None
    corpus_note: str = ""
    engine_config: str = "10m"

    @property
    def on_gpu(self) -> bool:
        """True when the sections run on CUDA."""
        return self.device == "cuda"


# ============================================================================================ helpers
def child_env() -> dict[str, str]:
    """Environment of every subprocess: the package importable, no wandb, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")]))
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def run_command(command: list[str], *, timeout_s: float, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in its own process group; on timeout kill the whole group (torchrun and its workers)."""
    proc = subprocess.Popen(
        command, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return subprocess.CompletedProcess(command, 124, out, None)
    return subprocess.CompletedProcess(command, proc.returncode, out, None)


def tail(text: str, lines: int = 25) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.strip().splitlines()[-lines:])


def root_cause(text: str) -> str:
    """The last ``SomeError: message`` line of a log (torchrun's own ChildFailedError report skipped)."""
    pattern = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*")
    hits = [m.group(0) for line in text.splitlines() if (m := pattern.match(line.strip()))]
    hits = [h for h in hits if "ChildFailedError" not in h]
    return hits[-1] if hits else ""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (empty when missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cuda_sync(device: Any) -> None:
    """Wait for queued CUDA work (no-op on CPU), so wall-clock timings are real."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================================ corpus
def write_synthetic_corpus(directory: Path, *, n_cells: int = 240, n_genes: int = 3_000, seed: int = 0) -> Path:
    """A seeded V1-style corpus (distinct genes per cell, frequent genes first) and its vocab; returns the dir."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = directory / "vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    names = ["<pad>", "<mask>"] + [f"ENSG{i:011d}" for i in range(n_genes)]
    (vocab / "token_dictionary.json").write_text(json.dumps({name: i for i, name in enumerate(names)}))
    lengths = np.clip(rng.lognormal(np.log(1_200), 0.4, size=n_cells), 200, 2_048).astype(int)
    base = rng.normal(0.0, 1.5, size=n_genes)
    cells = []
    for n in lengths:
        score = base + rng.gumbel(size=n_genes)
        top = np.argpartition(-score, n - 1)[:n]
        cells.append((top[np.argsort(-score[top])] + 2).astype(np.int32))
    split = np.where(rng.random(n_cells) < 0.1, "validation", "train")
    table = pa.table(
        {
            "input_ids": pa.array(cells, type=pa.list_(pa.int32())),
            "length": pa.array(lengths.astype(np.int32)),
            "split": pa.array(split.tolist()),
        }
    )
    pq.write_table(table, directory / "corpus.parquet")
    return directory


def resolve_corpus(args: argparse.Namespace, workdir: Path) -> tuple[list[str], str, str]:
    """``(corpus paths, vocab dir, note)``: the arguments, the carried demo corpus, or a synthetic one."""
    if args.corpus:
        if not args.vocab_dir:
            msg = "--corpus needs --vocab-dir"
            raise SystemExit(msg)
        return [str(Path(p).resolve()) for p in args.corpus], str(Path(args.vocab_dir).resolve()), "given"
    demo, vocab = REPO / "results" / "tokenized", REPO / "results" / "reference" / "vocab"
    files = sorted(demo.rglob("*.parquet"))
    if files and (vocab / "token_dictionary.json").is_file():
        return [str(f) for f in files], str(vocab), f"demo corpus ({len(files)} file(s) in results/tokenized)"
    synthetic = write_synthetic_corpus(workdir / "synthetic_corpus")
    return [str(synthetic / "corpus.parquet")], str(synthetic / "vocab"), "synthetic (240 cells, seeded)"


# ============================================================================================ environment
def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Version (or the import error) of each optional package."""
    out = {}
    for name in names:
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "imported"))
        except Exception as err:  # TE's CPU meta package raises RuntimeError, not ImportError
            out[name] = f"not importable: {type(err).__name__}: {str(err)[:200]}"
    return out


def section_environment(ctx: Context) -> dict[str, Any]:
    """Versions, device, the peak FLOP/s behind MFU, and which optional packages import."""
    import torch
    from geneformer_workflow.train.metrics import peak_flops

    result: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "corpus": ctx.corpus_note,
        "packages": package_versions(("megatron_fsdp", "transformer_engine", "hydra", "omegaconf", "transformers")),
    }
    if ctx.on_gpu:
        if not torch.cuda.is_available():
            msg = "no CUDA device is visible (use --dry-run on a CPU machine)"
            raise RuntimeError(msg)
        device = torch.device("cuda", 0)
        props = torch.cuda.get_device_properties(device)
        peak = peak_flops(device)
        result |= {
            "device": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gb": props.total_memory / 1e9,
            "multiprocessors": props.multi_processor_count,
            "peak_bf16_tflops": None if peak is None else peak / 1e12,
            "fp8_capable": (props.major, props.minor) >= (8, 9),
        }
    return result


# ============================================================================================ tests
def section_tests(ctx: Context) -> dict[str, Any]:
    """``pytest -m gpu`` over the training and model tests.

    A test module that cannot be imported on the GPU machine (a package missing there) is reported, not fatal:
    only failed GPU tests fail the section.
    """
    if ctx.tiny:
        msg = "dry run: the GPU tests skip themselves without CUDA"
        raise SectionSkipped(msg)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/train", "tests/model", "-q", "-rA",
               "-p", "no:cacheprovider", "--timeout", "100", "--continue-on-collection-errors"]  # fmt: skip
    proc = run_command(command, timeout_s=SECTION_LIMITS_S["tests"] - 10)
    print(proc.stdout, flush=True)
    summary = tail(proc.stdout, 1)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR ")]
    result = {"summary": summary, "exit_code": proc.returncode, "collection_errors": errors}
    ran = " passed" in summary or " failed" in summary
    if not ran and proc.returncode in (0, 5):
        msg = f"no GPU test ran: {summary}"
        raise SectionSkipped(msg)
    if not ran or " failed" in summary:
        msg = f"GPU tests failed or did not run (exit {proc.returncode}): {summary}"
        raise SectionError(msg, result)
    return result


# ============================================================================================ backends
def train_command(ctx: Context, config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    """``gfw train`` under ``torchrun --standalone --nproc_per_node 1`` on the context's corpus and device."""
    corpus = "data.corpus=[" + ",".join(ctx.corpus) + "]"
    base = [corpus, f"data.vocab_dir={ctx.vocab_dir}", f"run_dir={run_dir}", f"training.device={ctx.device}",
            f"training.precision={'bf16' if ctx.on_gpu else 'fp32'}", "wandb.mode=disabled"]  # fmt: skip
    if ctx.tiny:
        base += ["data.max_length=256", "data.micro_batch_size=2", "logging.peak_tflops=1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    return [*launcher, "-m", "geneformer_workflow", "train", "--config-name", config, *base, *overrides]


def run_backend(ctx: Context, backend: str, *, steps: int, resume_steps: int) -> dict[str, Any]:
    """Train ``steps`` steps with ``backend`` (checkpoint at the end), then resume to ``resume_steps`` if larger."""
    if backend == "mfsdp" and not ctx.on_gpu:
        return {"status": "skipped", "reason": "megatron-fsdp needs CUDA"}
    run_dir = Path(ctx.workdir) / f"backend_{backend}"
    overrides = [f"backend.name={backend}", "logging.log_every=1", f"logging.eval_every={steps}",
                 f"checkpoint.save_every={steps}"]  # fmt: skip
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "ok"}
    for max_steps in sorted({steps, resume_steps}):
        proc = run_command(train_command(ctx, "sanity", run_dir, [*overrides, f"training.max_steps={max_steps}"]),
                           timeout_s=120)  # fmt: skip
        print(f"--- backend {backend}, max_steps {max_steps}: exit {proc.returncode}\n{tail(proc.stdout, 15)}")
        if proc.returncode != 0:
            error = f"exit {proc.returncode} at max_steps={max_steps}: {root_cause(proc.stdout)}"
            return {"status": "failed", "error": error, "log_tail": tail(proc.stdout, 40)}
    records = read_jsonl(run_dir / "metrics.jsonl")
    final = json.loads((run_dir / "final.json").read_text())
    result["losses"] = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    result["final"] = final
    result["resumed_to"] = final["step"] if resume_steps > steps else None
    last = [r for r in records if "train/loss" in r][-1]
    keys = ("train/unpadded_tokens_per_second", "train/mfu", "train/gpu_memory_allocated_max_gb", "train/step_time")
    result["last_metrics"] = {k: last[k] for k in keys if k in last}
    result["seconds"] = time.perf_counter() - started
    if sorted(result["losses"]) != list(range(1, max(steps, resume_steps) + 1)):
        result |= {"status": "failed", "error": f"logged steps {sorted(result['losses'])}"}
    return result


def section_backends(ctx: Context) -> dict[str, Any]:
    """none, fsdp2 and megatron-fsdp on one device: train, checkpoint, resume, and compare losses."""
    steps, resume = (3, 4) if ctx.tiny else (10, 12)
    results = {b: run_backend(ctx, b, steps=steps, resume_steps=resume if b != "none" else steps) for b in BACKENDS}
    reference = results["none"].get("losses", {})
    for backend, res in results.items():
        common = sorted(set(reference) & set(res.get("losses", {})))
        if backend != "none" and common:
            res["max_loss_difference_vs_none"] = max(abs(res["losses"][s] - reference[s]) for s in common)
    failed = [b for b, r in results.items() if r["status"] == "failed"]
    if failed:
        msg = f"backends failed: {failed}: " + "; ".join(f"{b}: {results[b].get('error')}" for b in failed)
        raise SectionError(msg, results)
    return results


# ============================================================================================ throughput
def masked_batch(batch: int, length: int, vocab: int, device: Any, seed: int) -> tuple[Any, Any, Any]:
    """Full-length cells of random gene ids, 15 % masked (``<mask>`` = 1): (ids, attention mask, labels)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=gen)
    chosen = torch.rand(ids.shape, generator=gen) < 0.15
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.ones_like(ids), ids)
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


@contextlib.contextmanager
def bf16_autocast(device: Any) -> Iterator[None]:
    """bf16 autocast on CUDA (as the engine's none/ddp backends), nothing on CPU."""
    import torch

    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def build_model(preset: str, *, vocab: int, length: int, device: Any, checkpointing: bool) -> Any:
    """A Geneformer model of ``preset`` built on the meta device and initialised on ``device`` (fast for 4b)."""
    import torch
    from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig

    cfg = ModelConfig.from_preset(preset, vocab_size=vocab, max_position_embeddings=length,
                                  gradient_checkpointing=checkpointing)  # fmt: skip
    with torch.device("meta"):
        model = GeneformerForMaskedLM(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model.train()


def measure_steps(model: Any, batch: tuple[Any, Any, Any], *, warmup: int, steps: int, optimizer: Any) -> float:
    """Seconds per step (forward, backward and, with an optimizer, AdamW) after ``warmup`` untimed steps."""
    device = batch[0].device
    for i in range(warmup + steps):
        if i == warmup:
            cuda_sync(device)
            started = time.perf_counter()
        with bf16_autocast(device):
            loss = model(*batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    cuda_sync(device)
    return (time.perf_counter() - started) / steps


def flops_per_step(model: Any, batch: tuple[Any, Any, Any]) -> float:
    """Model FLOPs of one forward + backward on ``batch`` (full-length cells)."""
    from geneformer_workflow.train.metrics import model_flops

    ids, _, labels = batch
    b, t = ids.shape
    return model_flops(
        model.config.to_dict(), n_tokens=b * t, sum_sq_lengths=b * t * t, n_masked=int((labels != -100).sum())
    )


def device_peak(device: Any) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (None on CPU)."""
    from geneformer_workflow.train.metrics import peak_flops

    return peak_flops(device)


def microbenchmark(preset: str, batch: int, length: int, vocab: int, ctx: Context) -> dict[str, Any]:
    """bf16 training-step throughput of one model size on full-length cells."""
    import torch

    device = torch.device(ctx.device)
    model = build_model(preset, vocab=vocab, length=length, device=device, checkpointing=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = masked_batch(batch, length, vocab, device, seed=0)
    warmup, steps = (1, 2) if ctx.tiny else (3, 10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = measure_steps(model, data, warmup=warmup, steps=steps, optimizer=optimizer)
    flops, peak = flops_per_step(model, data), device_peak(device)
    out = {"preset": preset, "micro_batch": batch, "length": length, "vocab": vocab, "seconds_per_step": seconds,
           "tokens_per_second": batch * length / seconds, "model_tflops_per_second": flops / seconds / 1e12,
           "mfu_percent": None if peak is None else 100 * flops / seconds / peak}  # fmt: skip
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del model, optimizer
    return out


def transformers_microbenchmark(preset: str, batch: int, length: int, vocab: int, ctx: Context) -> dict[str, Any]:
    """The same step for ``transformers.BertForMaskedLM`` (sdpa, logits for every token): the reference's speed."""
    import torch
    import transformers
    from geneformer_workflow.model import ModelConfig

    device = torch.device(ctx.device)
    cfg = ModelConfig.from_preset(preset, vocab_size=vocab, max_position_embeddings=length)
    torch.manual_seed(0)
    with device:
        model = transformers.BertForMaskedLM._from_config(cfg.to_hf_config(), attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids, mask, labels = masked_batch(batch, length, vocab, device, seed=0)
    warmup, steps = (1, 2) if ctx.tiny else (3, 10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def call(i: Any, a: Any, y: Any) -> Any:  # measure_steps calls model(ids, mask, labels).loss
        return model(input_ids=i, attention_mask=a, labels=y)

    seconds = measure_steps(call, (ids, mask, labels), warmup=warmup, steps=steps, optimizer=optimizer)
    out = {"preset": preset, "micro_batch": batch, "length": length, "seconds_per_step": seconds,
           "tokens_per_second": batch * length / seconds}  # fmt: skip
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def engine_run(ctx: Context) -> dict[str, Any]:
    """The engine's own metrics (``train/mfu``, tokens/s) for a short bf16 10m run on the corpus."""
    steps, log_every = (4, 2) if ctx.tiny else (40, 20)
    config = "sanity" if ctx.tiny else "10m"
    run_dir = Path(ctx.workdir) / f"engine_{config}"
    overrides = [f"training.max_steps={steps}", f"logging.log_every={log_every}", "logging.eval_every=0",
                 f"checkpoint.save_every={steps}", "scheduler.warmup_steps=10"]  # fmt: skip
    proc = run_command(train_command(ctx, config, run_dir, overrides), timeout_s=120)
    print(f"--- engine run ({config}): exit {proc.returncode}\n{tail(proc.stdout, 12)}")
    if proc.returncode != 0:
        msg = f"engine run exit {proc.returncode}: {root_cause(proc.stdout)}"
        raise RuntimeError(msg)
    last = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r][-1]  # steady state
    return {"config": config, "steps": steps, "metrics": {k: v for k, v in last.items() if k.startswith("train/")}}


def section_throughput(ctx: Context) -> dict[str, Any]:
    """Throughput and MFU of 10m and 106m (tiny: the sanity shape), and the engine's MFU metric."""
    import torch

    sizes = [("sanity", 2, 128, 1_000)] if ctx.tiny else [("10m", 12, 2_048, V1_VOCAB), ("106m", 8, 4_096, V2_VOCAB)]
    results: dict[str, Any] = {}
    errors = []
    for preset, batch, length, vocab in sizes:
        try:
            results[preset] = microbenchmark(preset, batch, length, vocab, ctx)
            print(f"--- {preset}: {json.dumps(results[preset])}", flush=True)
        except Exception as err:
            results[preset] = {"error": f"{type(err).__name__}: {err}"}
            errors.append(preset)
        if ctx.on_gpu:
            torch.cuda.empty_cache()
        try:  # the reference on the same shape; its failure is recorded, not fatal
            reference = transformers_microbenchmark(preset, batch, length, vocab, ctx)
            if "seconds_per_step" in results[preset]:
                reference["ours_speedup"] = reference["seconds_per_step"] / results[preset]["seconds_per_step"]
            results[f"{preset}_transformers"] = reference
            print(f"--- {preset} transformers: {json.dumps(reference)}", flush=True)
        except Exception as err:
            results[f"{preset}_transformers"] = {"error": f"{type(err).__name__}: {err}"}
        if ctx.on_gpu:
            torch.cuda.empty_cache()
    try:
        results["engine"] = engine_run(ctx)
    except Exception as err:
        results["engine"] = {"error": f"{type(err).__name__}: {err}"}
        errors.append("engine")
    if errors:
        msg = f"failed: {errors}"
        raise SectionError(msg, results)
    return results


# ============================================================================================ packing
def variable_batch(batch: int, length: int, vocab: int, device: Any, seed: int) -> tuple[Any, Any, Any]:
    """Right-padded cells of lengths uniform in [length / 2, length], 15 % of real tokens masked."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(2, vocab, (batch, length), generator=gen) * mask
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.ones_like(ids), ids)
    return ids.to(device), mask.to(device), labels.to(device)


def packed_matches_padded(preset: str, vocab: int, length: int, ctx: Context) -> dict[str, Any]:
    """bf16 loss of the same batch padded vs packed (flash varlen on CUDA), and their largest logit difference."""
    import torch
    from geneformer_workflow.model import unpad

    device = torch.device(ctx.device)
    model = build_model(preset, vocab=vocab, length=length, device=device, checkpointing=False).eval()
    ids, mask, labels = variable_batch(4, length, vocab, device, seed=1)
    with torch.no_grad(), bf16_autocast(device):
        padded = model(ids, mask, labels)
        ids_1T, labels_1T, packed = unpad(ids, mask, labels)
        out = model(ids_1T, labels=labels_1T, packed=packed)
    return {"loss_padded": float(padded.loss), "loss_packed": float(out.loss),
            "max_abs_logit_difference": float((padded.logits.float() - out.logits.float()).abs().max())}  # fmt: skip


def packing_microbenchmark(preset: str, batch: int, length: int, vocab: int, ctx: Context) -> dict[str, Any]:
    """Step time of ours padded, ours packed (``unpad`` in the step) and transformers on variable-length cells."""
    import torch
    import transformers
    from geneformer_workflow.model import unpad

    device = torch.device(ctx.device)
    data = variable_batch(batch, length, vocab, device, seed=0)
    real_tokens = int(data[1].sum())
    warmup, steps = (1, 2) if ctx.tiny else (3, 10)
    ours = build_model(preset, vocab=vocab, length=length, device=device, checkpointing=False)
    cfg = ours.config
    with device:
        theirs = transformers.BertForMaskedLM._from_config(cfg.to_hf_config(), attn_implementation="sdpa").train()

    def packed_call(i: Any, a: Any, y: Any) -> Any:
        ids_1T, labels_1T, packed = unpad(i, a, y)
        return ours(ids_1T, labels=labels_1T, packed=packed)

    def hf_call(i: Any, a: Any, y: Any) -> Any:
        return theirs(input_ids=i, attention_mask=a, labels=y)

    out: dict[str, Any] = {"preset": preset, "micro_batch": batch, "length": length, "real_tokens": real_tokens}
    for name, call, params in (("ours_padded", ours, ours.parameters()), ("ours_packed", packed_call, None),
                               ("transformers", hf_call, theirs.parameters())):  # fmt: skip
        opt_params = list(params) if params is not None else list(ours.parameters())
        optimizer = torch.optim.AdamW(opt_params, lr=1e-4, fused=device.type == "cuda")
        seconds = measure_steps(call, data, warmup=warmup, steps=steps, optimizer=optimizer)
        out[name] = {"seconds_per_step": seconds, "non_pad_tokens_per_second": real_tokens / seconds}
    for name in ("ours_padded", "ours_packed"):
        out[f"{name}_speedup_vs_transformers"] = (
            out["transformers"]["seconds_per_step"] / out[name]["seconds_per_step"]
        )
    return out


def engine_packing_runs(ctx: Context) -> dict[str, Any]:
    """The engine on the corpus, padded vs packed batches; the padded run profiles a few steady-state steps."""
    steps, log_every = (4, 2) if ctx.tiny else (40, 10)
    config = "sanity" if ctx.tiny else ctx.engine_config
    results: dict[str, Any] = {}
    for packing in (False, True):
        run_dir = Path(ctx.workdir) / f"engine_{config}_packing_{packing}"
        overrides = [f"training.max_steps={steps}", f"logging.log_every={log_every}", "logging.eval_every=0",
                     f"checkpoint.save_every={steps}", "scheduler.warmup_steps=10",
                     f"data.packing={str(packing).lower()}"]  # fmt: skip
        if not packing:
            overrides.append(f"logging.profile_steps=[{steps - 3},{steps - 2}]")
        proc = run_command(train_command(ctx, config, run_dir, overrides), timeout_s=120)
        print(f"--- engine {config}, packing={packing}: exit {proc.returncode}\n{tail(proc.stdout, 8)}", flush=True)
        if proc.returncode != 0:
            results[f"packing_{packing}"] = {"error": f"exit {proc.returncode}: {root_cause(proc.stdout)}"}
            continue
        last = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r][-2]  # before the profile
        results[f"packing_{packing}"] = {k: v for k, v in last.items() if k.startswith("train/")}
        for table in sorted((run_dir / "profile").glob("*.txt")):
            results["profile_padded"] = table.read_text()[:6000]
            print(results["profile_padded"], flush=True)
    return results


def section_packing(ctx: Context) -> dict[str, Any]:
    """Packed vs padded batches: equal results, step time vs transformers, and the engine with data.packing."""
    import torch

    sizes = [("sanity", 4, 128, 1_000)] if ctx.tiny else [("10m", 12, 2_048, V1_VOCAB), ("106m", 8, 4_096, V2_VOCAB)]
    results: dict[str, Any] = {"varlen_attention": _varlen_available()}
    errors = []
    for preset, batch, length, vocab in sizes:
        for key in (f"{preset}_equal", f"{preset}_speed"):
            try:
                if key.endswith("_equal"):
                    results[key] = packed_matches_padded(preset, vocab, length, ctx)
                else:
                    results[key] = packing_microbenchmark(preset, batch, length, vocab, ctx)
                print(f"--- {key}: {json.dumps(results[key])}", flush=True)
            except Exception as err:
                results[key] = {"error": f"{type(err).__name__}: {err}"}
                errors.append(key)
                traceback.print_exc()
            if ctx.on_gpu:
                torch.cuda.empty_cache()
    try:
        results["engine"] = engine_packing_runs(ctx)
        errors += [f"engine {k}" for k, v in results["engine"].items() if isinstance(v, dict) and "error" in v]
    except Exception as err:
        results["engine"] = {"error": f"{type(err).__name__}: {err}"}
        errors.append("engine")
    if errors:
        msg = f"failed: {errors}"
        raise SectionError(msg, results)
    return results


def _varlen_available() -> bool:
    """Whether this torch has flash ``varlen_attn`` (used for packed batches on CUDA)."""
    from geneformer_workflow.model.layers import _flash_varlen

    return _flash_varlen() is not None


# ============================================================================================ 4b memory
def memory_case(model: Any, batch: int, length: int, vocab: int, *, checkpointing: bool, ctx: Context) -> dict:
    """Peak memory and speed of forward + backward for one micro-batch size (OOM is a result, not an error)."""
    import torch

    device = next(model.parameters()).device
    model.set_gradient_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    case = {"micro_batch": batch, "length": length, "checkpointing": checkpointing}
    try:
        data = masked_batch(batch, length, vocab, device, seed=batch)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = measure_steps(model, data, warmup=1, steps=1 if ctx.tiny else 2, optimizer=None)
        flops, peak = flops_per_step(model, data), device_peak(device)
        case |= {"seconds_per_step": seconds, "tokens_per_second": batch * length / seconds,
                 "mfu_percent": None if peak is None else 100 * flops / seconds / peak}  # fmt: skip
        if device.type == "cuda":
            case["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except torch.cuda.OutOfMemoryError as err:
        case["oom"] = str(err).splitlines()[0]
    finally:
        model.zero_grad(set_to_none=True)
    print(f"--- 4b memory: {json.dumps(case)}", flush=True)
    return case


def optimizer_case(model: Any, length: int, vocab: int, ctx: Context) -> dict[str, Any]:
    """Peak memory of micro-batch 1 with checkpointing plus one fused AdamW step (fp32 weights, grads, moments)."""
    import torch

    device = next(model.parameters()).device
    model.set_gradient_checkpointing(True)
    case: dict[str, Any] = {"micro_batch": 1, "length": length, "checkpointing": True, "adamw_step": True}
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        seconds = measure_steps(model, masked_batch(1, length, vocab, device, seed=7), warmup=0, steps=1,
                                optimizer=optimizer)  # fmt: skip
        case["seconds_per_step"] = seconds
        if device.type == "cuda":
            case["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        del optimizer
    except torch.cuda.OutOfMemoryError as err:
        case["oom"] = str(err).splitlines()[0]
    print(f"--- 4b memory: {json.dumps(case)}", flush=True)
    return case


def section_memory_4b(ctx: Context) -> dict[str, Any]:
    """The 4b model on one device: memory of forward + backward with activation checkpointing."""
    import torch
    from geneformer_workflow.model import num_parameters

    preset, length, vocab, batches = ("sanity", 128, 1_000, (1, 2)) if ctx.tiny else ("4b", 4_096, V2_VOCAB, (1, 2, 4))
    device = torch.device(ctx.device)
    model = build_model(preset, vocab=vocab, length=length, device=device, checkpointing=True)
    result: dict[str, Any] = {"preset": preset, "parameters": num_parameters(model.config)}
    if device.type == "cuda":
        result["weights_gb"] = torch.cuda.memory_allocated(device) / 1e9
    cases = [memory_case(model, b, length, vocab, checkpointing=True, ctx=ctx) for b in batches]
    cases.append(memory_case(model, 1, length, vocab, checkpointing=False, ctx=ctx))
    cases.append(optimizer_case(model, length, vocab, ctx))
    result["cases"] = cases
    return result


# ============================================================================================ orchestration
SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": section_environment,
    "tests": section_tests,
    "backends": section_backends,
    "throughput": section_throughput,
    "memory_4b": section_memory_4b,
    "packing": section_packing,
}


def run_section_here(name: str, ctx: Context, out_file: Path) -> None:
    """Child process: run one section and write ``{"status", "result", "error"}`` to ``out_file``."""
    record: dict[str, Any] = {"status": "ok"}
    try:
        record["result"] = SECTIONS[name](ctx)
    except SectionSkipped as err:
        record |= {"status": "skipped", "reason": str(err)}
    except SectionError as err:
        record |= {"status": "failed", "error": str(err), "result": err.result}
    except Exception as err:
        record |= {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        print(record["traceback"], flush=True)
    out_file.write_text(json.dumps(record, indent=2, default=str))


def run_section(name: str, ctx_file: Path, limit_s: float, log: Any) -> dict[str, Any]:
    """Parent: run one section in a child process with a time limit; never raises."""
    out_file = ctx_file.with_name(f"section_{name}.json")
    out_file.unlink(missing_ok=True)
    started = time.perf_counter()
    command = [sys.executable, str(Path(__file__).resolve()), "--run-section", name, "--context", str(ctx_file)]
    print(f"\n=== {name} (limit {limit_s:.0f} s)", flush=True)
    proc = run_command(command, timeout_s=limit_s)
    seconds = time.perf_counter() - started
    log.write(f"\n===== section {name}: exit {proc.returncode}, {seconds:.1f} s\n{proc.stdout}\n")
    log.flush()
    if proc.returncode == 124:
        record = {"status": "timeout", "error": f"killed after {limit_s:.0f} s", "log_tail": tail(proc.stdout)}
    elif out_file.is_file():
        record = json.loads(out_file.read_text())
    else:
        record = {
            "status": "failed",
            "error": f"exit {proc.returncode} without a result",
            "log_tail": tail(proc.stdout),
        }
    record["seconds"] = seconds
    print(tail(proc.stdout, 8))
    print(f"=== {name}: {record['status']} in {seconds:.0f} s", flush=True)
    return record


def percent(value: float | None) -> str:
    """``41.2%``, or ``n/a`` where no peak FLOP/s is known (CPU)."""
    return "n/a" if value is None else f"{value:.1f}%"


def memory_label(case: dict[str, Any]) -> str:
    """``b2``, ``b1 no-ckpt``, ``b1 +AdamW``: a memory case's short name."""
    label = f"b{case['micro_batch']}" + ("" if case["checkpointing"] else " no-ckpt")
    return label + (" +AdamW" if case.get("adamw_step") else "")


def memory_value(case: dict[str, Any]) -> str:
    """Peak GB, OOM, or ok (CPU: no allocator statistics)."""
    if "peak_memory_gb" in case:
        return f"{case['peak_memory_gb']:.1f} GB"
    return "OOM" if "oom" in case else "ok"


def summary_line(name: str, record: dict[str, Any]) -> str:
    """One line per section for the printed summary and the Markdown file."""
    status, res = record["status"], record.get("result") or {}
    detail = record.get("error") or record.get("reason") or ""
    if status == "ok" and name == "environment":
        detail = f"{res.get('device', 'cpu')}, torch {res.get('torch')}, peak {res.get('peak_bf16_tflops')} TFLOP/s"
    elif status == "ok" and name == "tests":
        detail = res.get("summary", "")
    elif name == "backends" and res:
        detail = ", ".join(f"{b}: {r.get('status')} (final loss {r.get('final', {}).get('train_loss', 'n/a')})"
                           for b, r in res.items())  # fmt: skip
    elif name == "throughput" and res:
        detail = ", ".join(
            f"{k}: {v['tokens_per_second']:,.0f} tok/s, "
            + (f"ours {v['ours_speedup']:.2f}x" if "ours_speedup" in v else f"MFU {percent(v.get('mfu_percent'))}")
            for k, v in res.items() if "tokens_per_second" in v
        )  # fmt: skip
        engine = res.get("engine", {}).get("metrics", {})
        if "train/mfu" in engine:
            detail += f"; engine train/mfu {engine['train/mfu']:.1f}%"
    elif name == "packing" and res:
        parts = [f"varlen {res.get('varlen_attention')}"]
        for key, value in res.items():
            if key.endswith("_speed") and "ours_packed" in value:
                parts.append(f"{key[:-6]}: packed {value['ours_packed_speedup_vs_transformers']:.2f}x, padded "
                             f"{value['ours_padded_speedup_vs_transformers']:.2f}x vs transformers")  # fmt: skip
        engine = res.get("engine", {})
        for packing in ("False", "True"):
            tok = engine.get(f"packing_{packing}", {}).get("train/unpadded_tokens_per_second")
            if tok:
                parts.append(f"engine packing={packing}: {tok:,.0f} tok/s")
        detail = ", ".join(parts)
    elif name == "memory_4b" and res:
        detail = ", ".join(f"{memory_label(c)}: {memory_value(c)}" for c in res.get("cases", []))
    return f"{name:<12} {status:<8} {record.get('seconds', 0):>6.0f} s  {detail}"


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """A readable report: the summary lines, then each section's result as JSON."""
    lines = [f"# GPU check ({report['mode']})", "", f"Started {report['started']}, {report['total_seconds']:.0f} s.",
             "", "```", *report["summary"], "```", ""]  # fmt: skip
    for name, record in report["sections"].items():
        lines += [
            f"## {name}: {record['status']}",
            "",
            "```json",
            json.dumps(record, indent=2, default=str),
            "```",
            "",
        ]
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                        help="folder for gpu_check.json/.md/.log (default: $OUT, else ./gpu_check_out)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: exercises every code path")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, or cpu in --dry-run")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this (450 s)")
    parser.add_argument(
        "--corpus", nargs="+", help="tokenized parquet files or dirs of them (default: demo corpus, else synthetic)"
    )
    parser.add_argument("--vocab-dir", help="vocab dir of --corpus")
    parser.add_argument("--engine-config", default="10m", help="training config of the packing section's engine runs")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: /tmp/gfw_gpu_check_<pid>)")
    parser.add_argument("--run-section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections, write the report, print the summary; 1 if any section failed."""
    args = parse_args(argv)
    if args.run_section:
        ctx = Context(**json.loads(args.context.read_text()))
        run_section_here(args.run_section, ctx, args.context.with_name(f"section_{args.run_section}.json"))
        return 0
    device = args.device or ("cpu" if args.dry_run else "cuda")
    tiny = args.dry_run or device == "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = (args.workdir or Path("/tmp") / f"gfw_gpu_check_{os.getpid()}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, vocab_dir, note = resolve_corpus(args, workdir)
    ctx = Context(device=device, tiny=tiny, workdir=str(workdir), corpus=corpus, vocab_dir=vocab_dir, corpus_note=note,
                  engine_config=args.engine_config)  # fmt: skip
    ctx_file = workdir / "context.json"
    ctx_file.write_text(json.dumps(asdict(ctx)))
    started, stamp = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
    report: dict[str, Any] = {"mode": f"{device}{', tiny sizes' if tiny else ''}", "started": stamp, "sections": {}}
    with (args.out / "gpu_check.log").open("w") as log:
        for name in args.sections:
            left = args.budget_s - (time.perf_counter() - started)
            if left < 20:
                report["sections"][name] = {"status": "skipped", "reason": "no time left in --budget-s"}
                continue
            report["sections"][name] = run_section(name, ctx_file, min(SECTION_LIMITS_S[name], left), log)
    report["total_seconds"] = time.perf_counter() - started
    report["summary"] = [summary_line(n, r) for n, r in report["sections"].items()]
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(args.out / "gpu_check.md", report)
    print("\n# Summary\n" + "\n".join(report["summary"]) + f"\nresults: {args.out}/gpu_check.json, .md, .log")
    return 1 if any(r["status"] in {"failed", "timeout"} for r in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
