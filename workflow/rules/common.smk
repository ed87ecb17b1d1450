import glob
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


def find_inputs(patterns):
    """Input .h5ad files by dataset name (file stem), from paths and glob patterns."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ValueError(f"config 'inputs': the pattern {pattern!r} matches no file")
        files.extend(matches)
    datasets = {}
    for path in files:
        name = Path(path).name.removesuffix(".h5ad")
        if name in datasets and datasets[name] != path:
            raise ValueError(f"config 'inputs': two files share the dataset name {name!r}: {datasets[name]}, {path}")
        if not Path(path).is_file():
            raise ValueError(f"config 'inputs': {path} does not exist")
        datasets[name] = path
    return datasets


def check_model_config(name):
    available = sorted(
        p.stem for p in TRAIN_CONFIG_DIR.glob("*.yaml") if p.stem != "defaults" and not p.stem.startswith("_")
    )
    if name not in available:
        raise ValueError(f"config 'model': unknown model {name!r}; choose one of {available} (config/train/)")
    return name


def check_config_paths():
    """Every file the config names must exist before any job runs (a misspelt path is never skipped silently)."""
    paths = {
        "vocabulary.token_dictionary": config["vocabulary"].get("token_dictionary"),
        "vocabulary.gene_medians": config["vocabulary"].get("gene_medians"),
    }
    if config.get("gene_mapping") and config["gene_mapping"] != "GRCh38":
        paths["gene_mapping"] = config["gene_mapping"]
    for key, path in paths.items():
        if path and not Path(path).exists():
            raise ValueError(f"config '{key}': {path} does not exist (relative paths start at {Path.cwd()})")
    reserved = ("input_ids", "length", "cell_id", "split")
    columns = list(config["tokenize"]["obs_columns"])
    clashes = sorted(set(columns) & set(reserved))
    if clashes:
        raise ValueError(
            f"config 'tokenize.obs_columns': {clashes} are the corpus's own column names {list(reserved)}; "
            "rename those obs columns in the input files or leave them out"
        )
    if len(set(columns)) != len(columns):
        raise ValueError(f"config 'tokenize.obs_columns': {columns} lists a column twice")


DATASETS = find_inputs(config["inputs"])
check_config_paths()
MODEL = check_model_config(str(config["model"]))
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
# cluster job) opens only new or changed inputs: geneformer_workflow/_plan.py, docs/scale.md.
INPUT_CELLS_CACHE = ".snakemake/geneformer/input_cells.json"


def plan_shards(datasets, shard_cells):
    """Row ranges (start, stop) per dataset: large files are tokenized as parallel shards.

    Without h5py where Snakemake runs (e.g. --use-conda with a bare Snakemake), every file is one shard.
    """
    if str(SCRIPTS_DIR) not in sys.path:
        sys.path.insert(0, str(SCRIPTS_DIR))
    try:
        from geneformer_workflow._plan import cached_cell_counts, plan_row_ranges
    except ImportError:
        return {name: [(0, None)] for name in datasets}
    cells = cached_cell_counts(datasets, config["counts"], INPUT_CELLS_CACHE)
    return {name: plan_row_ranges(n, shard_cells) for name, n in cells.items()}


SHARDS = plan_shards(DATASETS, config["tokenize"]["shard_cells"])


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


PRESET_MAX_LENGTH = {"v1": 2048, "v2": 4096}[config["tokenize"]["preset"]]


def hydra_quote(value):
    """A Hydra override value as a quoted string, so paths with spaces, commas or '=' stay one value."""
    text = str(value)
    if "'" in text or "\\" in text:
        raise ValueError(f"the path {text!r} contains a quote or backslash, which cannot be passed to the trainer")
    return f"'{text}'"


def pretrain_overrides(store, vocab_dir, run_dir):
    """The Hydra overrides of the pretraining job (the report shows the config they compose to).

    The corpus reaches the trainer as one path, the training store's index, whatever its number of shards.
    """
    return [
        f"data.store={hydra_quote(store)}",
        f"data.vocab_dir={hydra_quote(vocab_dir)}",
        f"data.max_length={PRESET_MAX_LENGTH}",
        f"run_dir={hydra_quote(run_dir)}",
        *config["pretrain"]["overrides"],
    ]


# ---- the pretraining job (docs/slurm.md) ----------------------------------------------------------
PRETRAIN_SHAPE_KEYS = ("nodes", "gpus_per_node", "nproc_per_node", "cpus_per_node", "mem_mb", "runtime")


def get_pretrain_job():
    """Job shape of pretrain_model: the model size's row of pretrain.sizes, then every pretrain.<key> set."""
    pretrain = config["pretrain"]
    job = dict(pretrain["sizes"].get(MODEL, {}))
    # int(): --config 'pretrain={"nodes": 2}' passes nested values as text (the schema allows digits only)
    job.update({key: int(pretrain[key]) for key in PRETRAIN_SHAPE_KEYS if pretrain.get(key) is not None})
    missing = [f"pretrain.{key}" for key in PRETRAIN_SHAPE_KEYS if job.get(key) is None]
    if missing:
        raise ValueError(
            f"config 'pretrain': no job shape for model {MODEL!r}: add pretrain.sizes.{MODEL} or set {missing}"
        )
    # SLURM task slots per node: one per torchrun process, but at least 2, because the SLURM executor
    # plugin refuses srun-launched ("mpi") jobs with one task per node. They only size the allocation:
    # the training step is one task per node holding all of the node's CPUs (get_pretrain_launch).
    job["tasks_per_node"] = max(job["nproc_per_node"], 2)
    job["cpus_per_task"] = -(-job["cpus_per_node"] // job["tasks_per_node"])
    gpu_type = pretrain.get("gpu_type")
    gpus = job["gpus_per_node"]
    # Per node, as sbatch --gres expects; None = no GRES request (CPU training).
    job["gres"] = (f"gpu:{gpu_type}:{gpus}" if gpu_type else f"gpu:{gpus}") if gpus else None
    return job


def use_srun():
    """Start torchrun through srun: launcher=srun, or launcher=auto inside a SLURM job (a SLURM executor job)."""
    launcher = config["pretrain"]["launcher"]
    return launcher == "srun" or (launcher == "auto" and "SLURM_JOB_ID" in os.environ)


def get_pretrain_launch(wildcards, resources):
    """srun that starts torchrun_node.sh once per node of the job; empty on one machine (torchrun --standalone)."""
    if not use_srun():
        return ""
    options = [
        f"--nodes={resources.nodes}",
        f"--ntasks={resources.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={resources.tasks_per_node * resources.cpus_per_task}",
        "--kill-on-bad-exit=1",  # one node failing stops the others instead of leaving them in a collective
    ]
    if resources.get("gres"):
        options.append(f"--gres={resources.gres}")
    if resources.nodes > 1:
        options.append("--label")  # prefix each log line with the task (= node) number
    return "srun " + " ".join(options)


PRETRAIN_JOB = get_pretrain_job()


# ---- the evaluation (evaluate.smk); the plan lives in geneformer_workflow/_evaluation_plan.py -----------------------
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))
from geneformer_workflow._evaluation_plan import checkpoint_files, evaluation_options, find_evaluations

EVALUATIONS = find_evaluations(config["evaluate"])


def get_evaluation_h5ad(wildcards):
    return EVALUATIONS[wildcards.evaluation]["path"]


def get_checkpoint_files(wildcards=None):
    return checkpoint_files(config["evaluate"])


def get_evaluation_options(wildcards):
    return evaluation_options(EVALUATIONS[wildcards.evaluation], config, model=MODEL, export_dir=EXPORT_DIR)
