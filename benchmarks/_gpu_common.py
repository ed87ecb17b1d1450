"""What the GPU check scripts share: child processes with time limits, training runs, sections and the report.

A *section* answers one measured question (``environment``, ``backends``, ``throughput``, ...); each script in
``benchmarks/gpu_*.py`` defines its sections as :class:`Section` records, and :func:`main` runs the selected ones,
each in its own process (the script that defines it, with ``--run-section``) under a time limit, so a failure, a
hang or an out-of-memory is recorded and the next section still runs (``--jobs 2`` runs two at a time, on CPU
only). Within a section, :class:`Parts` records a failing part and runs the next. The report is
``OUT/<report>.json``, ``OUT/<report>.md`` (the summary lines, then each section's JSON) and ``OUT/<report>.log``
(all child output).

Not a script: the ``benchmarks/gpu_*.py`` scripts and ``te_acceptance.py`` put this folder on ``sys.path`` and
import it; importing it puts ``workflow/scripts`` there, so that ``geneformer_workflow`` imports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))
LOG_LOCK = threading.Lock()


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


@dataclass(frozen=True)
class Section:
    """One measured question: the function that answers it, its time limit on a GPU, its summary line.

    ``summarize`` turns the section's result into the detail of its summary line; with ``summarize_failed`` False
    a failed section's line shows its error instead of its partial result.
    """

    name: str
    run: Callable[[Context], dict[str, Any]]
    limit_s: float
    summarize: Callable[[dict[str, Any]], str]
    summarize_failed: bool = True

    @property
    def script(self) -> Path:
        """The script that defines the section (its process runs that file with ``--run-section``)."""
        return Path(sys.modules[self.run.__module__].__file__).resolve()


class Parts:
    """A section's results part by part: a part that raises is recorded as ``{"error": ...}``, the next still runs."""

    def __init__(self, results: dict[str, Any] | None = None) -> None:
        self.results: dict[str, Any] = results or {}
        self.failed: list[str] = []

    def run(self, key: str, compute: Callable[[], Any], *, fatal: bool = True, echo: bool = True) -> Any:
        """``results[key] = compute()``, printed with ``echo``; on an error, with ``fatal``, the section fails."""
        try:
            self.results[key] = compute()
            if echo:
                print(f"--- {key}: {json.dumps(self.results[key], default=str)}", flush=True)
        except Exception as err:
            self.results[key] = {"error": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
            if fatal:
                self.failed.append(key)
        return self.results[key]

    def finish(self) -> dict[str, Any]:
        """The results, or :class:`SectionError` carrying them when a fatal part failed."""
        if self.failed:
            msg = f"failed: {self.failed}"
            raise SectionError(msg, self.results)
        return self.results


# ============================================================================================ processes
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


# ============================================================================================ training runs
def write_synthetic_corpus(directory: Path, *, n_cells: int = 240, n_genes: int = 3_000, seed: int = 0) -> Path:
    """A seeded V1-style corpus (distinct genes per cell, frequent genes first) and its vocab; returns the dir."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = directory / "vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    names = ["<pad>", "<mask>"] + [f"ENSG{i:011d}" for i in range(n_genes)]
    tokens = {name: i for i, name in enumerate(names)}
    (vocab / "token_dictionary.json").write_text(json.dumps(tokens))
    # The tokenizer config with model_max_length, as `gfw vocab` writes it: data.max_length: null reads it.
    from geneformer_workflow.tokenize.vocab import TOKENIZER_CONFIG, hf_tokenizer_files

    (vocab / TOKENIZER_CONFIG).write_text(hf_tokenizer_files(tokens, max_length=2_048)[TOKENIZER_CONFIG])
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


def train_command(ctx: Context, config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    """``gfw train`` under ``torchrun --standalone --nproc_per_node 1`` on the context's corpus and device."""
    corpus = "data.corpus=[" + ",".join(ctx.corpus) + "]"
    base = [corpus, f"data.vocab_dir={ctx.vocab_dir}", f"run_dir={run_dir}", f"training.device={ctx.device}",
            f"training.precision={'bf16' if ctx.on_gpu else 'fp32'}", "wandb.mode=disabled"]  # fmt: skip
    if ctx.tiny:
        base += ["data.max_length=256", "data.micro_batch_size=2", "logging.peak_tflops=1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    return [*launcher, "-m", "geneformer_workflow", "train", "--config-name", config, *base, *overrides]


def engine_overrides(steps: int, log_every: int) -> list[str]:
    """Overrides of a short engine run: ``steps`` steps, logged every ``log_every``, no evaluation, one checkpoint."""
    return [f"training.max_steps={steps}", f"logging.log_every={log_every}", "logging.eval_every=0",
            f"checkpoint.save_every={steps}", "scheduler.warmup_steps=10"]  # fmt: skip


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """The logged training steps (records with ``train/loss``) of a run's metrics.jsonl."""
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def run_engine(
    ctx: Context, config: str, run_dir: Path, overrides: list[str], *, timeout_s: float = 120
) -> list[dict[str, Any]]:
    """One ``gfw train`` run (2-minute limit by default); its logged training steps, or RuntimeError with the log's
    cause."""
    proc = run_command(train_command(ctx, config, run_dir, overrides), timeout_s=timeout_s)
    print(f"--- engine {run_dir.name}: exit {proc.returncode}\n{tail(proc.stdout, 10)}", flush=True)
    if proc.returncode != 0:
        msg = f"engine run exit {proc.returncode}: {root_cause(proc.stdout)}"
        raise RuntimeError(msg)
    return train_records(run_dir)


def train_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The ``train/*`` metrics of one logged step."""
    return {k: v for k, v in record.items() if k.startswith("train/")}


# ============================================================================================ sections
def run_section_here(section: Section, ctx: Context, out_file: Path) -> None:
    """Child process: run one section and write ``{"status", "result", "error"}`` to ``out_file``."""
    record: dict[str, Any] = {"status": "ok"}
    try:
        record["result"] = section.run(ctx)
    except SectionSkipped as err:
        record |= {"status": "skipped", "reason": str(err)}
    except SectionError as err:
        record |= {"status": "failed", "error": str(err), "result": err.result}
    except Exception as err:
        record |= {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        print(record["traceback"], flush=True)
    out_file.write_text(json.dumps(record, indent=2, default=str))


def run_section(section: Section, ctx_file: Path, limit_s: float, log: TextIO) -> dict[str, Any]:
    """Parent: run one section in a child process with a time limit; never raises."""
    name = section.name
    out_file = ctx_file.with_name(f"section_{name}.json")
    out_file.unlink(missing_ok=True)
    started = time.perf_counter()
    command = [sys.executable, str(section.script), "--run-section", name, "--context", str(ctx_file)]
    print(f"\n=== {name} (limit {limit_s:.0f} s)", flush=True)
    proc = run_command(command, timeout_s=limit_s)
    seconds = time.perf_counter() - started
    with LOG_LOCK:  # sections side by side (--jobs) write whole blocks
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
    print(f"{tail(proc.stdout, 8)}\n=== {name}: {record['status']} in {seconds:.0f} s", flush=True)
    return record


def run_sections(sections: list[Section], ctx_file: Path, *, budget_s: float, jobs: int, log: TextIO) -> dict:
    """Run ``sections``, ``jobs`` at a time, and return their records in the given order.

    A section not started within ``budget_s`` seconds is skipped.
    """
    started = time.perf_counter()

    def run_within_budget(section: Section) -> dict[str, Any]:
        left = budget_s - (time.perf_counter() - started)
        if left < 20:
            return {"status": "skipped", "reason": "no time left in --budget-s"}
        return run_section(section, ctx_file, min(section.limit_s, left), log)

    # Side by side, the longest first (the time limits rank them as their run times do), so none runs alone at the end.
    order = sorted(sections, key=lambda s: -s.limit_s) if jobs > 1 else sections
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # one worker: one section after the other
        futures = {section.name: pool.submit(run_within_budget, section) for section in order}
        return {section.name: futures[section.name].result() for section in sections}


# ============================================================================================ report
def percent(value: float | None) -> str:
    """``41.2%``, or ``n/a`` where no peak FLOP/s is known (CPU)."""
    return "n/a" if value is None else f"{value:.1f}%"


def summary_line(section: Section, record: dict[str, Any]) -> str:
    """One line per section for the printed summary and the Markdown file."""
    status, res = record["status"], record.get("result") or {}
    detail = record.get("error") or record.get("reason") or ""
    if res and (status == "ok" or section.summarize_failed):
        detail = section.summarize(res)
    return f"{section.name:<12} {status:<8} {record.get('seconds', 0):>6.0f} s  {detail}"


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


def parse_args(sections: dict[str, Section], description: str, argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of every GPU check script (``--sections`` chooses among the script's own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                        help="folder for the report .json/.md/.log (default: $OUT, else ./gpu_check_out)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: exercises every code path")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, or cpu in --dry-run")
    parser.add_argument("--sections", nargs="+", choices=list(sections), default=list(sections))
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this (450 s)")
    parser.add_argument("--jobs", type=int, default=1, help="sections run side by side (CPU only; default 1)")
    parser.add_argument(
        "--corpus", nargs="+", help="tokenized parquet files or dirs of them (default: demo corpus, else synthetic)"
    )
    parser.add_argument("--vocab-dir", help="vocab dir of --corpus")
    parser.add_argument("--engine-config", default="10m", help="training config of the packing section's engine runs")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: /tmp/gfw_gpu_check_<pid>)")
    parser.add_argument("--run-section", choices=list(sections), help=argparse.SUPPRESS)
    parser.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(sections: list[Section], *, report_name: str, description: str, argv: list[str] | None = None) -> int:
    """Run the selected sections, write ``OUT/<report_name>.json/.md/.log``, print the summary; 1 if one failed."""
    by_name = {s.name: s for s in sections}
    args = parse_args(by_name, description, argv)
    if args.run_section:
        ctx = Context(**json.loads(args.context.read_text()))
        run_section_here(by_name[args.run_section], ctx, args.context.with_name(f"section_{args.run_section}.json"))
        return 0
    device = args.device or ("cpu" if args.dry_run else "cuda")
    tiny = args.dry_run or device == "cpu"
    if args.jobs < 1 or (args.jobs > 1 and device == "cuda"):
        msg = f"--jobs {args.jobs}: sections run side by side only on CPU (on a GPU they would share its memory)"
        raise SystemExit(msg)
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
    with (args.out / f"{report_name}.log").open("w") as log:
        selected = [by_name[name] for name in args.sections]
        report["sections"] = run_sections(selected, ctx_file, budget_s=args.budget_s, jobs=args.jobs, log=log)
    report["total_seconds"] = time.perf_counter() - started
    report["summary"] = [summary_line(by_name[n], r) for n, r in report["sections"].items()]
    (args.out / f"{report_name}.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(args.out / f"{report_name}.md", report)
    print("\n# Summary\n" + "\n".join(report["summary"]) + f"\nresults: {args.out}/{report_name}.json, .md, .log")
    return 1 if any(r["status"] in {"failed", "timeout"} for r in report["sections"].values()) else 0
