import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version, validate

min_version("9.0")


if "layer" in config.get("embed", {}):  # renamed: a bare layer number meant another layer than Geneformer's
    raise ValueError(
        f"config 'embed.layer' ({config['embed']['layer']}) was replaced: set embed.hidden_state to the same number "
        "to keep that layer (-1 = the last), or remove it to use embed.geneformer_emb_layer: -1 (the second-to-last "
        "layer, as Geneformer's EmbExtractor default); see config/README.md"
    )
validate(config, "../schemas/config.schema.yaml")


class MachineLocal:
    """A rule param that names this machine's copy of the project (interpreter, package directory).

    Snakemake records params of builtin types and reruns a job when one changes; values of other types are not
    recorded. Wrapping these keeps a moved or copied project (or another virtualenv) from rerunning every job,
    pretraining included; the shell command sees the text (str), quoted where it is a single path.
    """

    def __init__(self, text):
        self.text = str(text)

    def __str__(self):
        return self.text

    def __format__(self, spec):
        return format(self.text, spec)


# The package lives beside the rules; rules call it with this PYTHONPATH so that they also work with
# --use-conda, inside SLURM jobs and when the rules are imported into another workflow as a module.
SCRIPTS_DIR = Path(workflow.current_basedir).parent / "scripts"
TRAIN_CONFIG_DIR = Path(workflow.current_basedir).parent.parent / "config" / "train"
# Without --use-conda, jobs use the Python that runs Snakemake (e.g. the project's virtualenv).
PYTHON = MachineLocal(
    "python"
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else shlex.quote(sys.executable)
)
GFW = MachineLocal(
    f"PYTHONPATH={shlex.quote(str(SCRIPTS_DIR))}${{PYTHONPATH:+:$PYTHONPATH}} {PYTHON} -m geneformer_workflow"
)

# Planning (inputs, shards, job shapes, the evaluation) lives in the package beside the rules, imported once here;
# it needs only the standard library (h5py for the header reads of new inputs, without which a file is one shard).
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))
from geneformer_workflow.plan.evaluation import checkpoint_files, evaluation_options, find_evaluations
from geneformer_workflow.plan.inputs import check_config_paths, find_inputs, plan_shards
from geneformer_workflow.plan.pretrain import check_model_config, pretrain_job, pretrain_launch, pretrain_overrides

DATASETS = find_inputs(config["inputs"])
check_config_paths(config)
MODEL = check_model_config(str(config["model"]), TRAIN_CONFIG_DIR)
EXPORT_DIR = f"results/export/{MODEL}"


# dataset: a file stem (one path component). Not an alternation of every dataset name: Snakemake inlines the
# constraint into every pattern it matches and rewrites, which made planning quadratic in the number of inputs
# (2,000 inputs: 180 of 190 s of `snakemake -n`, docs/scale.md). Unknown names are refused by get_h5ad.
wildcard_constraints:
    dataset=r"[^/]+",
    model=re.escape(MODEL),
    shard=r"\d{4}",


def get_h5ad(wildcards):
    return DATASETS[known_dataset(wildcards.dataset)]


def known_dataset(name):
    """``name`` when it is an input's dataset name, else a clear error (a target for a file nobody gave)."""
    if name not in DATASETS:
        raise ValueError(
            f"results of dataset {name!r} were requested, but no input file is named {name}.h5ad "
            f"(config 'inputs' gives {len(DATASETS)} files)"
        )
    return name


# Cells per input, cached per file state (size, mtime, inode), so that planning (here, and again inside every
# cluster job) opens only new or changed inputs: geneformer_workflow/plan/inputs.py, docs/scale.md.
INPUT_CELLS_CACHE = ".snakemake/geneformer/input_cells.json"


SHARDS = plan_shards(DATASETS, config["counts"], config["tokenize"]["shard_cells"], INPUT_CELLS_CACHE)


def get_shard_rows(wildcards):
    shards = SHARDS[known_dataset(wildcards.dataset)]
    if int(wildcards.shard) >= len(shards):
        raise ValueError(
            f"shard {wildcards.shard} of dataset {wildcards.dataset!r} was requested, but with tokenize.shard_cells "
            f"{config['tokenize']['shard_cells']} it has {len(shards)} shard(s)"
        )
    start, stop = shards[int(wildcards.shard)]
    return "" if stop is None else f"--rows {start}:{stop}"


def get_dataset_shards(wildcards):
    """The corpus shards of one dataset, in row order."""
    shards = SHARDS[known_dataset(wildcards.dataset)]
    return [f"results/tokenized/{wildcards.dataset}/shard-{i:04d}.parquet" for i in range(len(shards))]


def get_corpus_shards(wildcards=None):
    """Every corpus shard of every dataset."""
    return [
        f"results/tokenized/{name}/shard-{i:04d}.parquet"
        for name, shards in SHARDS.items()
        for i in range(len(shards))
    ]


def get_corpus_indexes(wildcards=None):
    """The dataset index (dataset.json) of every dataset: the exact shards of the corpus."""
    return [f"results/tokenized/{name}/dataset.json" for name in DATASETS]


# The list of those indexes (list_corpus_datasets): the corpus of exactly this config's inputs, for gfw commands.
CORPUS_LIST = "results/tokenized/datasets.txt"


# The training store (store.smk): one part per corpus shard, and its index, the trainer's one data path.
STORE_INDEX = "results/store/store.json"


def get_store_parts(wildcards=None):
    """The training store part (its manifest) of every corpus shard, in corpus order."""
    prefix = len("results/tokenized/")
    return [f"results/store/{path[prefix:].removesuffix('.parquet')}.json" for path in get_corpus_shards(wildcards)]


def input_options():
    """gfw options that say where counts and gene ids are in the input files (shell-quoted)."""
    options = ["--counts", config["counts"]]
    if config.get("gene_id_key"):
        options += ["--gene-id-key", config["gene_id_key"]]
    if config.get("gene_mapping"):
        options += ["--gene-mapping", config["gene_mapping"]]
    options += ["--chunk-size", config["tokenize"]["chunk_size"]]
    return shlex.join(map(str, options))


def qc_options():
    options = []
    for key, flag in (
        ("min_counts", "--min-counts"),
        ("max_counts", "--max-counts"),
        ("min_genes", "--min-genes"),
        ("max_genes", "--max-genes"),
        ("max_pct_mito", "--max-pct-mito"),
    ):
        value = config["qc"].get(key)
        options.append(f"{flag} {'none' if value is None else value}")
    return " ".join(options)


def get_gene_medians():
    """The user's gene medians when given, else the ones computed from the inputs."""
    return config["vocabulary"].get("gene_medians") or "results/reference/gene_medians.tsv"


def obs_columns_option():
    columns = config["tokenize"]["obs_columns"]
    return shlex.join(["--obs-columns", ",".join(columns)]) if columns else ""


def existing_dictionary_option():
    path = config["vocabulary"].get("token_dictionary")
    return shlex.join(["--token-dictionary", path]) if path else ""


def get_pretrain_overrides(store, vocab_dir, run_dir):
    """The Hydra overrides of the pretraining job (the tokens per cell come from the vocabulary)."""
    return pretrain_overrides(store, vocab_dir, run_dir, list(config["pretrain"]["overrides"]))


# ---- the pretraining job (docs/slurm.md) ----------------------------------------------------------
def get_pretrain_launch(wildcards, resources):
    """srun that starts torchrun_node.sh once per node of the job; empty on one machine (torchrun --standalone)."""
    return pretrain_launch(config["pretrain"], resources, os.environ)


PRETRAIN_JOB = pretrain_job(config["pretrain"], MODEL)


# ---- the evaluation (evaluate.smk); the plan: geneformer_workflow/plan/evaluation.py ---------------------------------
EVALUATIONS = find_evaluations(config["evaluate"])


def get_evaluation_h5ad(wildcards):
    return EVALUATIONS[wildcards.evaluation]["path"]


def get_checkpoint_files(wildcards=None):
    return checkpoint_files(config["evaluate"])


def get_evaluation_options(wildcards):
    return evaluation_options(EVALUATIONS[wildcards.evaluation], config, model=MODEL, export_dir=EXPORT_DIR)
