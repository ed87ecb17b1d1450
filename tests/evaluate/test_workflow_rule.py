"""The evaluation rule in the DAG: its command line from the config, and config errors before any job."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from geneformer_workflow.evaluate.cli import build_parser

from ..workflow.helpers import REPO, run_snakemake, write_config

EVAL_DEMO = REPO / "resources" / "demo" / "pbmc_cite_seq_labelled.h5ad"
DATASET = {"path": str(EVAL_DEMO), "label_key": "cell_type", "batch_key": "batch"}


def _evaluate_command(stdout: str) -> list[str]:
    """The words of the printed ``gfw evaluate`` shell command, up to the log redirection."""
    line = next(line for line in stdout.splitlines() if " evaluate " in line and "geneformer_workflow" in line)
    words = shlex.split(line.split(" > ")[0])
    return words[words.index("evaluate") + 1 :]


def test_the_rule_evaluates_the_run_model_its_random_twin_and_pca(tmp_path: Path):
    write_config(tmp_path, evaluate={"datasets": [DATASET], "n_folds": 3, "seed": 7})
    result = run_snakemake(tmp_path, "-n", "-p")
    assert result.returncode == 0, result.stderr
    assert "evaluate_embeddings" in result.stdout
    argv = _evaluate_command(result.stdout)
    args = build_parser().parse_args(argv)  # the rule's command is one the CLI accepts
    assert args.h5ad == EVAL_DEMO and args.label_key == "cell_type" and args.batch_key == "batch"
    assert args.model == [["sanity", "results/export/sanity"]] and args.random_weights == ["sanity"]
    assert args.pca and args.n_folds == 3 and args.seed == 7
    assert args.scores == Path("results/evaluate/pbmc_cite_seq_labelled/scores.tsv")
    assert args.umap == Path("results/evaluate/pbmc_cite_seq_labelled/umap_by_label.png")


def test_a_listed_checkpoint_is_passed_with_its_dictionaries(tmp_path: Path):
    checkpoint = tmp_path / "gf"
    checkpoint.mkdir()
    (tmp_path / "tokens.pkl").write_bytes(b"")
    (tmp_path / "medians.pkl").write_bytes(b"")
    entry = {"name": "gf", "path": str(checkpoint), "token_dictionary": str(tmp_path / "tokens.pkl")}
    entry["gene_medians"] = str(tmp_path / "medians.pkl")
    write_config(tmp_path, evaluate={"datasets": [DATASET], "checkpoints": [entry], "random_weights": False})
    result = run_snakemake(tmp_path, "-n", "-p")
    assert result.returncode == 0, result.stderr
    args = build_parser().parse_args(_evaluate_command(result.stdout))
    assert args.model == [["sanity", "results/export/sanity"], ["gf", str(checkpoint)]]
    assert args.dictionaries == [["gf", str(tmp_path / "tokens.pkl"), str(tmp_path / "medians.pkl")]]
    assert args.random_weights == []


def test_no_evaluation_without_datasets_or_when_disabled(tmp_path: Path):
    for evaluate in ({}, {"enabled": False, "datasets": [DATASET]}):
        write_config(tmp_path, evaluate=evaluate)
        result = run_snakemake(tmp_path, "-n")
        assert result.returncode == 0, result.stderr
        assert "evaluate_embeddings" not in result.stdout


@pytest.mark.parametrize(
    ("evaluate", "message"),
    [
        (
            {"datasets": [{"path": "missing.h5ad", "label_key": "x"}]},
            "config 'evaluate.datasets': missing.h5ad does not",
        ),
        ({"datasets": [{"path": str(EVAL_DEMO)}]}, "'label_key' is a required property"),
        ({"datasets": [DATASET, DATASET]}, "two datasets are named 'pbmc_cite_seq_labelled'"),
        (
            {"checkpoints": [{"name": "gf", "path": "nope", "token_dictionary": "t.pkl", "gene_medians": "m.pkl"}]},
            "config 'evaluate.checkpoints' (gf): path nope does not exist",
        ),
        ({"n_folds": 1}, "n_folds"),
    ],
    ids=["missing-file", "no-label-key", "duplicate-name", "missing-checkpoint", "one-fold"],
)
def test_bad_evaluation_config_is_rejected_before_any_job(tmp_path: Path, evaluate, message):
    write_config(tmp_path, evaluate={"datasets": [DATASET], **evaluate})
    result = run_snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
