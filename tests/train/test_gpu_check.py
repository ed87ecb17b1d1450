"""benchmarks/gpu_check.py and its section scripts: the CPU dry run exercises every section; a failing section does
not stop the others; each script runs its own sections alone."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, subprocess_env

BENCHMARKS = REPO / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"
SECTIONS = ["environment", "tests", "backends", "throughput", "memory_4b", "packing"]
SECTION_SCRIPTS = ["gpu_environment", "gpu_backends", "gpu_throughput", "gpu_memory_4b", "gpu_packing"]


def load_common():
    """The scripts' shared helpers as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_gpu_common", BENCHMARKS / "_gpu_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_gpu_common"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_check(tmp_path: Path, *args: str, script: Path = SCRIPT, timeout: float = 300):
    """Run ``script`` into ``tmp_path/out``; returns the process and its JSON report."""
    command = [sys.executable, str(script), "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), *args]
    proc = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    report_file = tmp_path / "out" / f"{script.stem}.json"
    assert report_file.is_file(), f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(report_file.read_text())


@pytest.mark.slow
def test_dry_run_exercises_every_section_on_cpu(small_corpus, tmp_path):
    corpus = ["--corpus", *map(str, small_corpus.files), "--vocab-dir", str(small_corpus.vocab_dir)]
    proc, report = run_check(tmp_path, "--dry-run", "--jobs", "2", *corpus)  # two sections at a time
    sections = report["sections"]
    assert proc.returncode == 0, "\n".join(report["summary"]) + json.dumps(sections, indent=1)[-4000:]
    assert list(sections) == SECTIONS
    assert {n: s["status"] for n, s in sections.items()} == {n: "skipped" if n == "tests" else "ok" for n in SECTIONS}
    backends = sections["backends"]["result"]
    assert backends["mfsdp"] == {"status": "skipped", "reason": "megatron-fsdp needs CUDA"}
    assert backends["fsdp2"]["resumed_to"] == 4 and backends["fsdp2"]["max_loss_difference_vs_none"] < 1e-5
    throughput = sections["throughput"]["result"]
    assert throughput["sanity"]["tokens_per_second"] > 0 and throughput["sanity"]["model_tflops_per_second"] > 0
    assert throughput["sanity_transformers"]["ours_speedup"] > 0
    assert throughput["engine"]["metrics"]["train/mfu"] > 0  # the dry run sets logging.peak_tflops=1
    for lever in ("fused_qkv", "compile", "compile_fused_qkv"):  # each speed lever on, against the plain model
        assert throughput[f"sanity_{lever}"]["speedup_vs_plain"] > 0 and "mfu_percent" in throughput[f"sanity_{lever}"]
    doubled = throughput["sanity_micro_batch_x2"]
    assert doubled["micro_batch"] == 2 * throughput["sanity"]["micro_batch"]
    assert doubled["tokens_per_second_vs_plain"] > 0
    assert "engine_levers" not in throughput  # GPU only (tests/train/test_speed_options.py checks it on CPU)
    assert [c["micro_batch"] for c in sections["memory_4b"]["result"]["cases"]] == [1, 2, 1, 1]
    packing = sections["packing"]["result"]
    assert packing["sanity_equal"]["max_abs_logit_difference"] < 1e-4  # fp32 on CPU
    assert packing["sanity_speed"]["ours_packed"]["seconds_per_step"] > 0
    assert packing["sanity_speed"]["ours_packed_jagged"]["seconds_per_step"] > 0
    assert packing["sanity_speed"]["jagged_dropout_cost"] > -1
    for run in ("packing_True", "packing_True_jagged"):
        assert packing["engine"][run]["train/unpadded_tokens_per_second"] > 0
    assert "aten::" in packing["engine"]["profile_padded"]
    assert [line.split()[0] for line in report["summary"]] == SECTIONS
    assert "# Summary" in proc.stdout and (tmp_path / "out" / "gpu_check.md").is_file()
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("===== section") == len(SECTIONS)


def test_failing_sections_are_recorded_and_the_rest_still_run(tmp_path):
    # --device cuda on a machine without CUDA: both sections fail, each in its own process, and the report is written.
    if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available():
        pytest.skip("checks the failure path; this machine has CUDA")
    proc, report = run_check(tmp_path, "--device", "cuda", "--sections", "environment", "memory_4b")
    assert proc.returncode == 1
    assert {n: s["status"] for n, s in report["sections"].items()} == {"environment": "failed", "memory_4b": "failed"}
    assert "no CUDA device" in report["sections"]["environment"]["error"]
    assert report["summary"][0].startswith("environment  failed") and "no CUDA device" in report["summary"][0]
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("===== section") == 2


def test_sections_run_side_by_side_only_on_cpu(tmp_path):
    command = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--device", "cuda", "--jobs", "2"]
    proc = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0 and "--jobs 2: sections run side by side only on CPU" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", SECTION_SCRIPTS)
def test_each_section_script_takes_the_check_options(name):
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and all(opt in proc.stdout for opt in ("--dry-run", "--sections", "--out", "--jobs"))


def test_a_section_script_runs_its_own_sections_alone(tmp_path):
    script = BENCHMARKS / "gpu_environment.py"
    proc, report = run_check(tmp_path, "--dry-run", "--sections", "tests", script=script)  # a quick skip on CPU
    assert proc.returncode == 0 and report["sections"] == {"tests": report["sections"]["tests"]}
    assert report["sections"]["tests"]["status"] == "skipped"
    assert (tmp_path / "out" / "gpu_environment.md").read_text().startswith("# GPU check (cpu, tiny sizes)")
    command = [sys.executable, str(script), "--dry-run", "--sections", "backends"]  # another script's section
    other = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert other.returncode == 2 and "invalid choice: 'backends'" in other.stderr


def test_a_failing_part_is_recorded_and_the_next_part_still_runs():
    common = load_common()
    parts = common.Parts({"note": 1})
    assert parts.run("first", lambda: 1 / 0) == {"error": "ZeroDivisionError: division by zero"}
    parts.run("reference", lambda: {}["missing"], fatal=False)  # recorded, does not fail the section
    assert parts.run("second", lambda: {"tokens_per_second": 5.0}) == {"tokens_per_second": 5.0}
    with pytest.raises(common.SectionError, match=r"failed: \['first'\]") as raised:
        parts.finish()
    assert list(raised.value.result) == ["note", "first", "reference", "second"]
    assert raised.value.result["reference"] == {"error": "KeyError: 'missing'"}


def test_root_cause_skips_torchrun_boilerplate():
    log = "Traceback\nValueError: data.corpus entry 'x' matches no parquet file\nChildFailedError: \n  exitcode: 1"
    assert load_common().root_cause(log) == "ValueError: data.corpus entry 'x' matches no parquet file"


def test_synthetic_corpus_trains_without_a_tokenized_demo(tmp_path):
    directory = load_common().write_synthetic_corpus(tmp_path, n_cells=20)
    import pyarrow.parquet as pq

    table = pq.read_table(directory / "corpus.parquet")
    assert table.num_rows == 20 and set(table.column("split").to_pylist()) <= {"train", "validation"}
    ids = table.column("input_ids").to_pylist()
    assert all(len(set(cell)) == len(cell) and min(cell) >= 2 for cell in ids)
    assert (directory / "vocab" / "token_dictionary.json").is_file()
