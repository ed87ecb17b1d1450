"""Every documented command is exercised, and the README's Troubleshooting quotes messages that really occur.

``COMMANDS`` maps each command of the shell code blocks in README.md, config/README.md and docs/*.md, and each
command in the README's inline code, to how it is exercised. ``check`` says what runs here, in seconds:

- ``run``: run as written (Snakemake in a temporary copy of the checkout: the shipped config, profile and data);
- ``dry-run``: Snakemake with ``-n`` added, ``make -n``;
- ``parse``: the real argument parsers (``gfw`` subcommands, torchrun's launcher), and for ``train`` the Hydra
  config composed and validated, without training;
- ``help``: the script's ``--help`` runs and lists every option the command uses;
- ``pytest``: the marker it selects is registered;
- ``syntax``: ``bash -n`` of the script it runs;
- ``paths``: nothing to run; the checkout paths it names exist (every check also does this);
- ``None``: nothing here; ``tests`` run it for real.

``tests`` names the tests that run the command for real (minutes, a GPU or a SLURM cluster); ``why`` says why it
is not run here. A documented command missing from the table fails, so does an entry no longer documented or a
named test that no longer exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from geneformer_workflow.cli import OWN_PARSER_COMMANDS

from ..workflow.helpers import REPO, run_snakemake

DOC_FILES = sorted([REPO / "README.md", REPO / "config" / "README.md", *(REPO / "docs").glob("*.md")])
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
# Inline code in the README that starts like this is a command (e.g. `make demo`, `pytest -m slurm`).
INLINE_COMMANDS = re.compile(r"^(\.venv/bin/\S+|python|pytest|snakemake|make|bash) \S")
# Paths inside the checkout that a command names (results/ and the like are outputs, not checked).
REPO_PATH = re.compile(r"(?:^|[\s='\"]|\$PWD/)((?:workflow|benchmarks|profiles|config|resources|tests)/[^\s'\"\]]*)")

END_TO_END = "tests/workflow/test_end_to_end.py::test_pretraining_checkpoints_and_exports_a_loadable_model"
REPORT = "tests/workflow/test_report.py::test_report_renders_every_figure_in_headless_chromium"
SLURM_RUN = "tests/slurm/test_slurm_workflow.py::test_every_step_runs_as_a_slurm_job_and_the_export_loads"
SLURM_SRUN = "tests/slurm/test_slurm_workflow.py::test_pretraining_starts_torchrun_on_both_nodes_through_srun"
SLURM_LAUNCHER = "tests/slurm/test_launch.py::test_launcher_meets_at_the_first_node_of_the_srun_step"
ONE_PROCESS = "tests/train/test_checkpoint.py::test_sigterm_saves_a_checkpoint_and_exits_zero"
TORCHRUN = "tests/train/test_sanity_demo.py::test_sanity_tier_lowers_the_validation_loss_on_real_cells"
EXPORT = "tests/train/test_export.py::test_export_cli_takes_a_step_directory_and_a_vocab_dir"
EMBED = "tests/model/test_embed.py::test_gfw_embed_equals_mean_pooled_hf_bert_hidden_states"
HF_DATASET = "tests/tokenize/test_hf_dataset.py::test_split_directory_loads_and_holds_exactly_its_rows"
EVALUATE = "tests/evaluate/test_evaluate_cli.py::test_models_and_baselines_are_scored_on_the_same_cells"
STORE_CLI = "tests/train/test_store.py::test_gfw_store_part_index_and_build_give_the_same_store"
STORE_TRAIN = "tests/train/test_store.py::test_training_on_a_store_matches_training_on_the_corpus"
GPU = "needs GPUs and hours; the GPU tests (tests/train/test_gpu.py) run the GPU paths"
CLUSTER = "needs a SLURM cluster; tests/slurm runs the profile on a throw-away one"


@dataclass(frozen=True)
class Cover:
    """How one documented command is exercised (see the module docstring)."""

    check: str | None
    tests: tuple[str, ...] = ()
    why: str = ""


COMMANDS: dict[str, Cover] = {
    # README.md: quick start, development
    "make demo": Cover("dry-run", (END_TO_END,), "the real run is the end-to-end test (minutes)"),
    "make test": Cover("dry-run", why="it is the test suite itself; CI runs it through .ci/run"),
    "make lint": Cover("dry-run", why="ruff and snakemake --lint; CI runs them"),
    # README.md: your own data, model size
    ".venv/bin/snakemake -n": Cover("run"),
    ".venv/bin/snakemake --cores 8": Cover("dry-run", (END_TO_END,), "a real run takes minutes"),
    ".venv/bin/snakemake -n --config model=10m": Cover("run"),
    ".venv/bin/snakemake --cores 8 --config model=106m": Cover("dry-run", why=GPU),
    ".venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 -m geneformer_workflow train "
    "--config-name sanity data.store=results/store/store.json data.vocab_dir=results/reference/vocab "
    "run_dir=results/pretrain/manual": Cover("parse", (TORCHRUN,), "needs the demo corpus; 2-process training"),
    ".venv/bin/gfw export results/pretrain/manual results/export/manual": Cover(
        "parse", (END_TO_END, EXPORT), "needs a trained run directory"
    ),
    # README.md: cell embeddings, report
    ".venv/bin/gfw embed --model results/export/sanity results/tokenized/datasets.txt -o cells.h5ad": Cover(
        "parse", (EMBED, END_TO_END), "needs an exported model"
    ),
    # README.md: using the outputs with Geneformer's tools
    ".venv/bin/gfw hf-dataset results/tokenized/pbmc_5k_protein_v3/dataset.json --split train "
    "-o results/hf/pbmc_5k_protein_v3.train": Cover("parse", (HF_DATASET,), "needs a tokenized corpus"),
    ".venv/bin/snakemake --report report.html": Cover(None, (REPORT,), "needs a finished run"),
    # docs/report.md: evaluation
    ".venv/bin/gfw evaluate resources/demo/pbmc_cite_seq_labelled.h5ad --label-key cell_type --batch-key batch "
    "--model sanity results/export/sanity --random-weights sanity --pca --scores scores.tsv "
    "--embeddings embeddings.h5ad --table scores.html --umap umap.png": Cover(
        "parse", (EVALUATE,), "needs an exported model"
    ),
    "snakemake --report report.html": Cover(None, (REPORT,), "needs a finished run"),
    # README.md: SLURM
    ".venv/bin/snakemake -n --profile profiles/slurm": Cover("run"),
    ".venv/bin/snakemake --profile profiles/slurm --config model=4b": Cover("dry-run", (SLURM_RUN,), CLUSTER),
    "pytest -m slurm": Cover("pytest", (SLURM_RUN,), CLUSTER),
    # README.md: benchmarks (minutes each)
    "python benchmarks/tokenization.py --repeat 7 --big-cells 100000": Cover("help", why="a benchmark, minutes"),
    "python benchmarks/parquet_encoding.py": Cover("help", why="a benchmark, minutes"),
    "python benchmarks/batching.py --threads 1": Cover("help", why="a benchmark, minutes"),
    "python benchmarks/model_cpu.py": Cover("help", why="a benchmark, minutes"),
    # README.md: troubleshooting
    ".venv/bin/snakemake --unlock": Cover("run"),
    # docs/report.md
    "snakemake --cores 2": Cover("dry-run", (END_TO_END, REPORT), "a real run takes minutes"),
    "gfw embed --model results/export/10m results/tokenized/datasets.txt -o cells.h5ad "
    "'[--geneformer-emb-layer' '-1]' '[--batch-size' '16]'": Cover("parse", (EMBED,), "needs an exported model"),
    # docs/tokenization.md
    "gfw hf-dataset results/tokenized/my_dataset/dataset.json --split train -o results/hf/my_dataset.train": Cover(
        "parse", (HF_DATASET,), "needs a tokenized corpus"
    ),
    # docs/slurm.md
    ".venv/bin/snakemake --profile profiles/slurm --config model=106m": Cover("dry-run", (SLURM_RUN,), CLUSTER),
    ".venv/bin/snakemake --profile profiles/slurm --config model=4b "
    """'pretrain={"nodes": 8, "gpu_type": "h100"}'""": Cover("dry-run", (SLURM_RUN,), CLUSTER),
    "export 'PYTHONPATH=$PWD/workflow/scripts' OMP_NUM_THREADS=1": Cover(
        "paths", (SLURM_SRUN,), "the environment of the srun line below it"
    ),
    "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=64 bash workflow/scripts/torchrun_node.sh 2 8 "
    "'$(which python)' -m geneformer_workflow train --config-name 106m run_dir=/shared/run "
    "data.store=/shared/results/store/store.json data.vocab_dir=/shared/results/reference/vocab": Cover(
        "parse", (SLURM_SRUN, SLURM_LAUNCHER), CLUSTER
    ),
    ".venv/bin/python -m pytest -m slurm": Cover("pytest", (SLURM_RUN,), CLUSTER),
    # docs/training.md
    "gfw train --config-name sanity 'data.corpus=[results/tokenized/pbmc.parquet]' data.vocab_dir=results/vocab "
    "run_dir=results/train/sanity": Cover("parse", (ONE_PROCESS,), "needs a corpus"),
    "OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 -m geneformer_workflow train "
    "--config-name sanity 'data.corpus=[a.parquet,b.parquet]' data.vocab_dir=results/vocab "
    "run_dir=results/train/sanity": Cover("parse", (TORCHRUN,), "needs a corpus; 2-process training"),
    "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 workflow/scripts/torchrun_node.sh 2 8 python -m "
    "geneformer_workflow train --config-name 106m run_dir=/shared/run data.store=/shared/results/store "
    "data.vocab_dir=/shared/vocab": Cover("parse", (SLURM_SRUN, SLURM_LAUNCHER), CLUSTER),
    "gfw store build results/tokenized/datasets.txt -o results/store --vocab-dir results/vocab": Cover(
        "parse", (STORE_CLI,), "needs a tokenized corpus"
    ),
    "gfw train --config-name 10m data.store=results/store data.vocab_dir=results/vocab "
    "run_dir=results/train/10m": Cover("parse", (STORE_TRAIN,), "needs a training store; 10m on CPU is slow"),
    "gfw export results/train/sanity results/export/sanity '[--vocab-dir' 'results/vocab]'": Cover(
        "parse", (EXPORT,), "needs a trained run directory"
    ),
    "bash benchmarks/gpu_wheels.sh": Cover("syntax", why="downloads wheels for the GPU machine (network)"),
    "bash benchmarks/gpu_check.sh": Cover(
        "syntax",
        ("tests/train/test_gpu_check.py::test_dry_run_exercises_every_section_on_cpu",),
        "needs a CUDA GPU; its Python part runs on CPU with --dry-run",
    ),
    "bash benchmarks/te_wheels.sh": Cover("syntax", why="downloads Transformer Engine for the GPU machine (network)"),
    "bash benchmarks/te_gpu.sh receive": Cover("syntax", why="stages carried wheels on a GPU machine"),
    "bash benchmarks/te_gpu.sh run": Cover(
        "syntax",
        ("tests/train/test_te_acceptance.py::test_dry_run_kills_resumes_exactly_and_writes_the_report",),
        "needs a CUDA GPU with Transformer Engine; its Python part runs on CPU with --dry-run",
    ),
}

# Where a quoted message comes from, when not from this project: "package/subdir" of its installed sources.
MESSAGE_SOURCES = {
    "Snakemake": "snakemake",
    "jsonschema": "jsonschema",
    "torch": "torch/cuda",
    "snakemake-executor-plugin-slurm": "snakemake_executor_plugin_slurm",
}
# A string literal continued on the next line ("…; "\n    "the fix"), joined so that messages read as one line.
ADJACENT_LITERALS = re.compile(r"""(["'])[ \t]*\n[ \t]*[rRbBuUfF]{0,2}\1""")


@dataclass(frozen=True)
class Documented:
    """A command as documented: its normalised text and ``file:line`` (of its code block, or its line)."""

    command: str
    where: str


@dataclass(frozen=True)
class Block:
    """A fenced shell code block."""

    language: str
    text: str
    where: str


def normalise(line: str) -> str:
    """One command as shell words without comments, re-quoted the same way whatever the source's quoting."""
    return shlex.join(shlex.split(line, comments=True))


def shell_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path`` written in a shell language."""
    blocks, language, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence and language is None:
            language, start, body = fence.group(1).lower(), number, []
        elif fence:
            if language in SHELL_LANGUAGES:
                blocks.append(Block(language, "\n".join(body) + "\n", f"{path.relative_to(REPO)}:{start}"))
            language = None
        elif language is not None:
            body.append(line)
    return blocks


def block_commands(block: Block) -> list[str]:
    """The commands of a block: continuation lines joined, comments and (console) output dropped."""
    lines = block.text.replace("\\\n", " ").splitlines()
    if block.language == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [command for command in map(normalise, lines) if command]


def inline_commands(path: Path) -> list[Documented]:
    """Commands written as inline code outside the code blocks of ``path``."""
    found, in_block = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"\s*```", line):
            in_block = not in_block
        elif not in_block:
            for span in re.findall(r"`([^`]+)`", line):
                if INLINE_COMMANDS.match(span):
                    found.append(Documented(normalise(span), f"{path.relative_to(REPO)}:{number}"))
    return found


def documented_commands() -> list[Documented]:
    """Every command of the docs: shell code blocks of all doc files, inline commands of the README."""
    found = [
        Documented(command, block.where)
        for path in DOC_FILES
        for block in shell_blocks(path)
        for command in block_commands(block)
    ]
    return found + inline_commands(REPO / "README.md")


def words_of(command: str) -> list[str]:
    """The command's words, without leading ``VAR=value`` assignments."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        words.pop(0)
    return words


def without_optional_brackets(words: list[str]) -> list[str]:
    """Usage notation ``[--layer -1]`` as plain words (Hydra lists such as ``data.corpus=[a]`` stay)."""
    plain, in_group = [], False
    for word in words:
        if word.startswith("[-"):
            word, in_group = word[1:], True
        if in_group and word.endswith("]"):
            word, in_group = word[:-1], False
        plain.append(word)
    return plain


# -- the table and the docs agree -----------------------------------------------------------------------------------


def test_every_documented_command_is_in_the_table():
    missing = [f"{d.where}: {d.command}" for d in documented_commands() if d.command not in COMMANDS]
    assert not missing, "add these commands to COMMANDS with how they are exercised:\n" + "\n".join(missing)


def test_every_table_entry_is_still_documented():
    documented = {d.command for d in documented_commands()}
    stale = [command for command in COMMANDS if command not in documented]
    assert not stale, "no longer in the docs; remove from COMMANDS:\n" + "\n".join(stale)


def test_the_readme_commands_are_found():
    readme = [d for d in documented_commands() if d.where.startswith("README.md")]
    assert len(readme) >= 15, readme


def test_every_command_not_run_here_names_its_tests_or_why():
    for command, cover in COMMANDS.items():
        assert cover.check in {"run", "dry-run", "parse", "help", "pytest", "syntax", "paths", None}, command
        if cover.check != "run":
            assert cover.tests or cover.why, f"say which tests run it, or why nothing does: {command}"
        if cover.check is None:
            assert cover.tests, f"nothing checks it here, so name the tests that run it: {command}"


def test_named_tests_exist():
    for cover in COMMANDS.values():
        for test in cover.tests:
            path, _, name = test.partition("::")
            assert (REPO / path).is_file(), f"{test}: no such file"
            if name:
                assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{test}: no such test"


def test_every_shell_block_is_valid_bash():
    for path in DOC_FILES:
        for block in shell_blocks(path):
            if block.language != "console":
                result = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
                assert result.returncode == 0, f"{block.where}: {result.stderr}"


# -- each command works as documented -------------------------------------------------------------------------------


@pytest.fixture
def checkout_copy(tmp_path: Path) -> Path:
    """A working directory like a fresh checkout: the shipped config, profiles and demo data, no results."""
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config.yaml")
    for name in ("profiles", "resources"):
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    return tmp_path


def check_snakemake(words: list[str], workdir: Path, *, dry_run: bool) -> None:
    args = words[1:] if "-n" in words or not dry_run else ["-n", *words[1:]]
    result = run_snakemake(workdir, *args, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if "-n" in args:
        assert "This was a dry-run" in result.stdout, result.stdout[-3000:]


def check_make(words: list[str]) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def gfw_arguments(words: list[str]) -> list[str]:
    """The words after ``gfw`` or ``-m geneformer_workflow``: the subcommand and its arguments."""
    for i, word in enumerate(words):
        if Path(word).name == "gfw" or (word == "geneformer_workflow" and words[i - 1] == "-m"):
            return without_optional_brackets(words[i + 1 :])
    msg = f"no gfw command in {words}"
    raise AssertionError(msg)


def check_torchrun(words: list[str]) -> None:
    """torchrun's own parser accepts the launcher options and runs the package as a module."""
    if "torch.distributed.run" not in words:
        return
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(words[words.index("torch.distributed.run") + 1 :])
    assert args.module and args.training_script == "geneformer_workflow", args


def check_gfw(words: list[str]) -> None:
    """The subcommand's own parser accepts the arguments; ``train`` also composes and validates its config."""
    argv = gfw_arguments(words)
    try:
        if argv[0] in OWN_PARSER_COMMANDS:
            module = importlib.import_module(OWN_PARSER_COMMANDS[argv[0]][0])
            parsed = module.build_parser().parse_args(argv[1:])
        else:
            parsed = importlib.import_module("geneformer_workflow.cli").build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"gfw rejects {argv} (exit {err.code}; its message is in the captured stderr)")
    if argv[0] == "train":
        from geneformer_workflow.train.config import compose_config, validate_config

        cfg = compose_config(parsed.config_name, parsed.overrides, parsed.config_dir)
        if cfg.data.max_length is None:  # the documented vocabulary is a workflow output, its length read at run time
            assert not Path(cfg.data.vocab_dir).exists(), f"{cfg.data.vocab_dir} exists but gives no model_max_length"
            cfg.data.max_length = 2048
        validate_config(cfg)


def check_help(words: list[str]) -> None:
    """The script's ``--help`` works and lists every option the command uses."""
    script = next(word for word in words if word.endswith(".py"))
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for option in (word for word in words if word.startswith("--")):
        assert option in result.stdout, f"{script} --help does not list {option}"


def check_pytest(words: list[str], markers: list[str]) -> None:
    registered = {line.split(":")[0].split("(")[0] for line in markers}
    options = words[words.index("pytest") + 1 :]
    selected = options[options.index("-m") + 1]
    assert set(re.findall(r"\w+", selected)) - {"and", "or", "not"} <= registered, (selected, registered)


def check_paths(command: str) -> None:
    for path in REPO_PATH.findall(command):
        assert (REPO / path).exists() or any(REPO.glob(path)), f"{path} does not exist in the checkout"


@pytest.mark.parametrize(
    "command", [c for c, cover in COMMANDS.items() if cover.check], ids=lambda c: c.removeprefix(".venv/bin/")[:60]
)
def test_documented_command_works(command, checkout_copy, pytestconfig):
    check, words = COMMANDS[command].check, words_of(command)
    check_paths(command)
    program = Path(words[0]).name
    if program == "snakemake":
        check_snakemake(words, checkout_copy, dry_run=check == "dry-run")
    elif program == "make":
        check_make(words)
    elif check == "parse":
        check_torchrun(words)
        check_gfw(words)
    elif check == "help":
        check_help(words)
    elif check == "pytest":
        check_pytest(words, pytestconfig.getini("markers"))
    elif check == "syntax":
        script = REPO / words[1]
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    else:
        assert check == "paths", f"no check {check!r} for {program}"


# -- troubleshooting ------------------------------------------------------------------------------------------------


def troubleshooting_quotes() -> list[tuple[str, str]]:
    """``(quoted message, its origin)`` of the first column of the README's Troubleshooting table."""
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Troubleshooting\n(.*?)(?=^## )", readme, re.M | re.S)
    assert section, "README.md has no Troubleshooting section"
    quotes = []
    for row in re.findall(r"^\| (.+?) \|", section.group(1), re.M):
        origin = re.search(r"\(([\w-]+)\)$", row)
        quotes += [(quote, origin.group(1) if origin else "") for quote in re.findall(r"`([^`]+)`", row)]
    return quotes


def source_text(origin: str) -> str:
    """The source code that a message of ``origin`` comes from ("" = this project's workflow and package)."""
    if origin:
        top, _, sub = MESSAGE_SOURCES[origin].partition("/")
        spec = importlib.util.find_spec(top)
        assert spec and spec.submodule_search_locations, f"{top} is not installed"
        files = sorted((Path(next(iter(spec.submodule_search_locations))) / sub).rglob("*.py"))
    else:
        files = [p for p in sorted((REPO / "workflow").rglob("*")) if p.suffix in {".py", ".smk", ".sh"}]
        files.append(REPO / "workflow" / "Snakefile")
    return "\n".join(ADJACENT_LITERALS.sub("", p.read_text(errors="replace")) for p in files)


def test_troubleshooting_quotes_messages_that_occur_in_the_code():
    quotes = troubleshooting_quotes()
    assert len(quotes) >= 15, quotes
    texts: dict[str, str] = {}
    for quote, origin in quotes:
        text = texts.setdefault(origin, source_text(origin))
        # "…" stands for the values the message fills in (file names, numbers): up to a line of code each.
        pattern = r"[^\n]{0,200}?".join(re.escape(part.strip()) for part in quote.split("…"))
        assert re.search(pattern, text), f"README Troubleshooting quotes {quote!r}, which {origin or 'the code'} lacks"
