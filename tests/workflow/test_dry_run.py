from __future__ import annotations

import re
import subprocess

import pytest

from .helpers import DEMO, REPO, SNAKEMAKE, run_snakemake, write_config


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
    from geneformer_workflow.tokenize.medians import FORMAT_VERSION

    rules = (REPO / "workflow" / "rules" / "qc.smk").read_text()  # qc_dataset writes the summaries
    assert f"summary_format={FORMAT_VERSION}," in rules


def per_input_jobs(workdir, **overrides):
    """Job counts and shell commands of a forced dry run over two inputs (two names for the demo file)."""
    for name in ("donor_a", "donor_b"):
        (workdir / f"{name}.h5ad").symlink_to(DEMO)
    write_config(workdir, inputs=[str(workdir / "*.h5ad")], **overrides)
    result = run_snakemake(workdir, "-n", "-p", "--forceall", timeout=300)
    assert result.returncode == 0, result.stderr
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE))
    commands = [line for line in result.stdout.splitlines() if "-m geneformer_workflow" in line]
    return jobs, commands


def test_each_input_is_three_jobs_qc_with_its_summary_tokenize_with_its_store_part_and_the_index(tmp_path):
    """Planning costs Snakemake 1-2 ms a job (docs/scale.md): QC writes the expression summary (one command, one
    pass), the tokenization job writes the shard's training-store part, and neither is a job of its own."""
    jobs, commands = per_input_jobs(tmp_path)
    assert jobs["qc_dataset"] == jobs["tokenize_dataset"] == jobs["index_dataset"] == "2"
    assert "summarize_expression" not in jobs and "store_shard" not in jobs
    per_input = {name: int(n) for name, n in jobs.items() if n == "2"}
    assert sum(per_input.values()) == 6, jobs
    qc = [c for c in commands if " qc " in c]
    assert len(qc) == 2 and all("--expression-summary results/medians/donor_" in c for c in qc)
    assert not any(" summarize " in c for c in qc)
    tokenize = [c for c in commands if " tokenize " in c]
    assert len(tokenize) == 2
    assert all(" store part results/tokenized/donor_" in c and "-o results/store/donor_" in c for c in tokenize)


def test_given_gene_medians_the_qc_job_writes_no_expression_summary(tmp_path):
    medians = tmp_path / "medians.tsv"
    medians.write_text("gene_id\tmedian\nENSG00000000003\t1.5\n")
    jobs, commands = per_input_jobs(tmp_path, vocabulary={"gene_medians": str(medians)})
    assert jobs["qc_dataset"] == "2" and "compute_gene_medians" not in jobs
    qc = [c for c in commands if " qc " in c]
    assert len(qc) == 2 and not any("--expression-summary" in c or "results/medians" in c for c in qc)
