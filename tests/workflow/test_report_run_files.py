"""The report's figures read a run directory safely: a killed run's metrics, a final.json from elsewhere.

``gfw plot`` runs in the report's conda env, which has no torch: these tests also keep it torch-free.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from geneformer_workflow.report import cli, configuration, training

from .helpers import REPO


def make_run(run_dir: Path, *, checkpoint: str = "checkpoints/step_3") -> Path:
    """A finished run's files as the report reads them: metrics, final.json, the final checkpoint's JSON."""
    step = run_dir / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "model_config.json").write_text(json.dumps({"vocab_size": 100}))
    (step / "checkpoint.json").write_text(json.dumps({"step": 3, "seed": 7}))
    (run_dir / "final.json").write_text(json.dumps({"checkpoint": checkpoint, "step": 3}))
    (run_dir / "config.yaml").write_text("seed: 7\ntraining:\n  max_steps: 3\n")
    records = [{"step": s, "train/loss": 4.0 / s, "train/unpadded_tokens_per_second": 9.0} for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_training_curves_drop_a_partial_last_metrics_line_with_a_warning(tmp_path, caplog):
    run_dir = make_run(tmp_path / "run")
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "train/lo')
    with caplog.at_level(logging.WARNING):
        training.plot_training_curves(run_dir, tmp_path / "loss.png", tmp_path / "tp.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert list(training.read_metrics(run_dir)["step"]) == [1, 2, 3]
    assert f"{run_dir / 'metrics.jsonl'}: dropping line 4, a partial record" in caplog.text


def test_a_corrupt_metrics_line_before_the_last_is_one_clear_error(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code = cli.cli_main(["training", str(run_dir), "--loss", str(tmp_path / "l.png"), "--throughput", "t.png"])
    assert code == 2
    err = capsys.readouterr().err
    prefix = f"gfw plot training: error: {run_dir / 'metrics.jsonl'}: line 2 of 3 is not a JSON record ("
    assert err.startswith(prefix) and err.endswith("Delete or repair that line, then rerun\n") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["training", "configuration"])
@pytest.mark.parametrize("checkpoint", ["../elsewhere/step_3", "/abs/checkpoints/step_3", "checkpoints/../../x"])
def test_a_final_json_pointing_outside_the_run_directory_is_refused(tmp_path, capsys, command, checkpoint):
    run_dir = make_run(tmp_path / "run", checkpoint=checkpoint)
    elsewhere = tmp_path / "elsewhere" / "step_3"  # what the first value would reach
    elsewhere.mkdir(parents=True)
    (elsewhere / "model_config.json").write_text(json.dumps({"vocab_size": 5}))
    out = tmp_path / "out"
    if command == "training":
        argv = ["training", str(run_dir), "--loss", f"{out}.png", "--throughput", f"{out}-tp.png"]
    else:
        argv = ["configuration", "-o", f"{out}.html", "--model-dir", str(tmp_path), "--run-dir", str(run_dir)]
    assert cli.cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gfw plot {command}: error: {run_dir / 'final.json'}: 'checkpoint'={checkpoint!r} is not")
    assert "checkpoints/step_<n> inside the run directory" in err and not list(tmp_path.glob("out*"))


def test_the_configuration_page_shows_the_config_the_run_wrote_and_the_final_checkpoint(tmp_path):
    run_dir = make_run(tmp_path / "run")
    configuration.write_configuration(
        tmp_path / "c.html", workflow_config={}, model_dir=tmp_path / "m", run_dir=run_dir
    )
    page = (tmp_path / "c.html").read_text()
    assert "<th>seed</th>" in page  # from the final checkpoint
    assert "training:\n  max_steps: 3" in page and f"as the run used it: {run_dir / 'config.yaml'}" in page


def test_the_configuration_page_of_a_run_without_its_config_is_one_clear_error(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    (run_dir / "config.yaml").unlink()
    out = tmp_path / "c.html"
    argv = ["configuration", "-o", str(out), "--model-dir", str(tmp_path), "--run-dir", str(run_dir)]
    assert cli.cli_main(argv) == 2
    assert f"{run_dir / 'config.yaml'} not found" in capsys.readouterr().err and not out.exists()


def test_the_report_modules_do_not_import_torch():
    """envs/report.yaml has no torch: the run-directory helpers must come from the torch-free run_dir module."""
    modules = ", ".join(
        f"geneformer_workflow.report.{m}" for m in ("cli", "corpus", "training", "umap", "configuration")
    )
    code = f"import sys, {modules}; sys.exit('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(REPO / "workflow" / "scripts")}, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()
