"""GPU acceptance of Transformer Engine, FP8 and the FP8 resume (issue 14); writes ``OUT/te_acceptance.json``.

Runs on a GPU machine where TE 2.20 is installed (``benchmarks/te_gpu.sh`` installs it offline and calls this):

1. ``pytest -m gpu`` over ``tests/model`` and ``tests/train`` (the TE tests included): passed / failed / skipped.
2. A 4b-wide model cut to ``--layers`` layers (2,560 wide, 40 heads, FFN 10,240) with the ``4b_te_fp8`` settings
   (TE layers, delayed-scaling FP8, megatron-fsdp on one GPU) trained ``--steps`` steps without a stop, and again
   with a checkpoint at ``--save-at``, a SIGKILL after it, and a rerun that resumes: the largest weight difference
   between the two final models (``fp8_resume``), expected 0.
3. The same steps with TE layers in bf16 and with torch layers in bf16: the largest per-step loss difference of FP8
   vs TE bf16 (``loss_gap_fp8_vs_bf16``) and tokens/s of each (median over the steps after the first two).

``--dry-run`` runs the plumbing on CPU with tiny sizes and torch layers only (the TE runs are recorded as skipped);
the test suite does that. The JSON always has every key; a part that could not run holds ``null`` and its reason
under ``notes``.

    python benchmarks/te_acceptance.py --out "$OUT"              # GPU, about 4 minutes on an H100
    python benchmarks/te_acceptance.py --dry-run --out /tmp/te    # CPU plumbing check
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (  # the GPU check scripts' shared helpers (a sibling file, not a package)
    REPO,
    child_env,
    package_versions,
    read_jsonl,
    root_cause,
    run_command,
    tail,
    write_synthetic_corpus,
)

RUN_TIMEOUT_S = 240


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "te_acceptance_out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, torch layers only")
    parser.add_argument("--layers", type=int, default=4, help="layers of the 4b-wide model (4)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each run (20)")
    parser.add_argument("--save-at", type=int, default=10, help="checkpoint step of the killed run (10)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: /tmp/gfw_te_<pid>)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    return parser.parse_args(argv)


# ============================================================================================ runs
def run_settings(args: argparse.Namespace) -> tuple[str, list[str]]:
    """``(config name, overrides)`` shared by every run: the 4b_te_fp8 config cut to a few layers."""
    common = [
        "logging.log_every=1",
        "logging.eval_every=0",
        f"checkpoint.save_every={args.save_at}",
        "checkpoint.keep_last=0",
        f"training.max_steps={args.steps}",
        "scheduler.warmup_steps=2",
        "wandb.mode=disabled",
    ]
    if args.dry_run:  # the sanity shape on CPU: fp32, FSDP2 unneeded, no TE
        return "sanity", [*common, "training.device=cpu", "data.max_length=128", "data.micro_batch_size=2"]
    shape = [f"model.num_hidden_layers={args.layers}", "data.max_length=2048", "data.micro_batch_size=2"]
    return "4b_te_fp8", [*common, *shape]


VARIANTS: dict[str, list[str]] = {
    "te_fp8": [],  # the 4b_te_fp8 settings as they are
    "te_bf16": ["fp8.enabled=false"],
    "torch_bf16": ["fp8.enabled=false", "model.use_te=false"],
}


def train_command(config: str, overrides: list[str], corpus: Path, vocab: Path, run_dir: Path) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    data = [f"data.corpus=[{corpus}]", f"data.vocab_dir={vocab}", f"run_dir={run_dir}"]
    return [*launcher, "-m", "geneformer_workflow", "train", "--config-name", config, *data, *overrides]


def train(command: list[str], run_dir: Path) -> dict[str, Any]:
    """Run to the end; the per-step losses and tokens/s, or the error."""
    proc = run_command(command, timeout_s=RUN_TIMEOUT_S)
    print(f"--- {run_dir.name}: exit {proc.returncode}\n{tail(proc.stdout, 12)}", flush=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {root_cause(proc.stdout) or tail(proc.stdout, 3)}"}
    return metrics_of(run_dir)


def metrics_of(run_dir: Path) -> dict[str, Any]:
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    speeds = [r["train/unpadded_tokens_per_second"] for r in records[2:]] or [
        r["train/unpadded_tokens_per_second"] for r in records
    ]
    return {
        "losses": {int(r["step"]): float(r["train/loss"]) for r in records},
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def train_killed_then_resumed(command: list[str], run_dir: Path, save_at: int) -> dict[str, Any]:
    """Start, SIGKILL the whole process group once ``checkpoints/step_<save_at>`` exists, then rerun to the end."""
    proc = subprocess.Popen(
        command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    checkpoint = run_dir / "checkpoints" / f"step_{save_at}"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not checkpoint.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    if not checkpoint.is_dir():
        return {"error": f"no checkpoint {checkpoint.name} before the kill: {root_cause(output) or tail(output, 3)}"}
    resumed = train(command, run_dir)
    return {**resumed, "killed": killed}


def final_weights(run_dir: Path) -> dict[str, Any]:
    """The final checkpoint's weights in an unwrapped torch model (the export path)."""
    from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig
    from geneformer_workflow.train.checkpoint import final_checkpoint, load_model_weights, read_json

    path = final_checkpoint(run_dir)
    model = GeneformerForMaskedLM(ModelConfig(**read_json(path / "model_config.json")))
    load_model_weights(path, model)
    return {key: value.float() for key, value in model.state_dict().items()}


def max_weight_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def max_loss_gap(a: dict[int, float], b: dict[int, float]) -> float | None:
    common = sorted(set(a) & set(b))
    return max(abs(a[s] - b[s]) for s in common) if common else None


# ============================================================================================ pytest
def pytest_gpu(out: Path) -> dict[str, int]:
    """``pytest -m gpu`` counts from its JUnit XML."""
    xml = out / "pytest_gpu.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/model", "tests/train", "-q", "-rA",
               "-p", "no:cacheprovider", "--timeout", "150", f"--junitxml={xml}"]  # fmt: skip
    proc = run_command(command, timeout_s=300)
    print(tail(proc.stdout, 40), flush=True)
    if not xml.is_file():
        return {"passed": 0, "failed": 0, "skipped": 0, "errors": 1}
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": tests - failures - errors - skipped, "failed": failures, "skipped": skipped, "errors": errors}


# ============================================================================================ main
def te_version() -> str | None:
    try:
        import transformer_engine

        return str(transformer_engine.__version__)
    except Exception as err:  # the CPU meta package raises RuntimeError
        print(f"transformer_engine does not import: {err!r}", flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(f"/tmp/gfw_te_{os.getpid()}")
    synthetic = write_synthetic_corpus(workdir / "corpus", n_cells=400 if not args.dry_run else 60)
    corpus, vocab = synthetic / "corpus.parquet", synthetic / "vocab"
    config, overrides = run_settings(args)
    notes: dict[str, str] = {}
    report: dict[str, Any] = {
        "te_version": te_version(),
        "packages": package_versions(("torch", "megatron_fsdp", "transformers")),
        "config": {"name": config, "overrides": overrides, "layers": args.layers, "dry_run": args.dry_run},
        "pytest_gpu": None,
        "fp8_resume": None,
        "loss_gap_fp8_vs_bf16": None,
        "loss_gap_te_bf16_vs_torch_bf16": None,
        "tokens_per_s": {name: None for name in VARIANTS},
        "losses": {},
        "notes": notes,
    }
    if args.skip_tests or args.dry_run:
        notes["pytest_gpu"] = "not run (--dry-run or --skip-tests)"
    else:
        report["pytest_gpu"] = pytest_gpu(args.out)
    runs = {name: run for name, run in VARIANTS.items() if not args.dry_run or "model.use_te=false" in run}
    results: dict[str, dict[str, Any]] = {}
    for name, extra in runs.items():
        run_dir = workdir / name
        results[name] = train(train_command(config, [*overrides, *extra], corpus, vocab, run_dir), run_dir)
    for name in VARIANTS.keys() - runs.keys():
        notes[name] = "not run: --dry-run has no Transformer Engine"
    resumed_name = "te_fp8" if "te_fp8" in runs else "torch_bf16"
    resumed_dir = workdir / f"{resumed_name}_resumed"
    command = train_command(config, [*overrides, *VARIANTS[resumed_name]], corpus, vocab, resumed_dir)
    resumed = train_killed_then_resumed(command, resumed_dir, args.save_at)
    for name, result in results.items():
        if "error" in result:
            notes[name] = result["error"]
        report["tokens_per_s"][name] = result.get("tokens_per_s")
        report["losses"][name] = result.get("losses")
    if "error" in resumed or "error" in results[resumed_name]:
        notes["fp8_resume"] = resumed.get("error") or results[resumed_name]["error"]
    else:
        gap = max_weight_gap(final_weights(resumed_dir), final_weights(workdir / resumed_name))
        report["fp8_resume"] = {
            "run": resumed_name,
            "steps": args.steps,
            "save_at": args.save_at,
            "killed": resumed["killed"],
            "max_weight_gap": gap,
            "max_loss_gap": max_loss_gap(resumed["losses"], results[resumed_name]["losses"]),
        }
    losses = {name: result.get("losses") or {} for name, result in results.items()}
    if "te_fp8" in losses and "te_bf16" in losses:
        report["loss_gap_fp8_vs_bf16"] = max_loss_gap(losses["te_fp8"], losses["te_bf16"])
    if "te_bf16" in losses and "torch_bf16" in losses:
        report["loss_gap_te_bf16_vs_torch_bf16"] = max_loss_gap(losses["te_bf16"], losses["torch_bf16"])
    (args.out / "te_acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=2), flush=True)
    failed = bool(report["pytest_gpu"] and report["pytest_gpu"]["failed"]) or report["fp8_resume"] is None
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
