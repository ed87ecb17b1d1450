from __future__ import annotations

import subprocess

import pytest

from .helpers import REPO, SNAKEMAKE, run_snakemake, write_config


@pytest.mark.parametrize("model", ["sanity", "10m", "106m", "4b", "4b_te_fp8"])
def test_dry_run_shows_the_whole_dag_for_every_model_size(model):
    # --forceall: the whole DAG even when a demo run already left results in this checkout
    command = [*SNAKEMAKE, "-n", "--forceall", "--config", f"model={model}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "This was a dry-run" in result.stdout
    assert "pretrain_model" in result.stdout and "export_model" in result.stdout


def test_dry_run_of_the_fresh_demo_lists_every_rule(tmp_path):
    write_config(tmp_path)
    result = run_snakemake(tmp_path, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    for rule in (
        "qc_dataset",
        "summarize_expression",
        "compute_gene_medians",
        "build_vocabulary",
        "tokenize_dataset",
        "pretrain_model",
        "export_model",
    ):
        assert rule in result.stdout
    assert not (tmp_path / "results").exists()


def test_dry_run_through_the_slurm_profile_needs_no_slurm():
    result = subprocess.run(
        [*SNAKEMAKE, "-n", "--forceall", "--profile", "profiles/slurm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "huge"}, "unknown model 'huge'"),
        ({"tokenize": {"preset": "v3"}}, "v3"),
        ({"typo_key": 1}, "typo_key"),
        ({"inputs": ["missing/*.h5ad"]}, "matches no file"),
        ({"vocabulary": {"gene_medians": "nope/x.tsv"}}, "config 'vocabulary.gene_medians': nope/x.tsv does not"),
        ({"vocabulary": {"token_dictionary": "nope.pkl"}}, "config 'vocabulary.token_dictionary': nope.pkl does not"),
        ({"gene_mapping": "nope.tsv"}, "config 'gene_mapping': nope.tsv does not exist"),
        ({"tokenize": {"obs_columns": ["split"]}}, "['split'] are the corpus's own column names"),
        ({"tokenize": {"obs_columns": ["a", "a"]}}, "lists a column twice"),
        ({"embed": {"layer": -1}}, "config 'embed.layer' (-1) was replaced: set embed.hidden_state"),
    ],
    ids=[
        "unknown-model",
        "bad-preset",
        "unknown-key",
        "no-input",
        "missing-medians",
        "missing-dictionary",
        "missing-mapping",
        "obs-column-clash",
        "obs-column-twice",
        "old-embed-layer",
    ],
)
def test_bad_config_is_rejected_before_any_job(tmp_path, overrides, message):
    write_config(tmp_path, **overrides)
    result = run_snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_the_summary_rule_names_the_current_summary_format():
    """A new summary format must rerun old summaries: the rule's params carry medians.FORMAT_VERSION."""
    from geneformer_workflow.medians import FORMAT_VERSION

    rules = (REPO / "workflow" / "rules" / "reference.smk").read_text()
    assert f"summary_format={FORMAT_VERSION}," in rules
