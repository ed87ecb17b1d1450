"""``AutoTokenizer.from_pretrained(vocab_dir)`` gives the token dictionary's ids with default arguments.

On the newest transformers (the project environment) and the oldest we claim (4.46.0, in a light cached
environment with only transformers + tokenizers, built from PyPI; skipped with pip's message when offline).
The checks themselves are in ``hf_tokenizer_checks.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.tokenize.vocab import build_token_dictionary, load_token_dictionary, write_vocab_dir

from . import hf_tokenizer_checks
from ._light_venv import light_venv, run_checks

DICTIONARIES = Path(__file__).resolve().parents[3] / "shared" / "geneformer-dictionaries"
OFFICIAL = {"v1": "v1/token_dictionary_gc30M.pkl", "v2": "v2/token_dictionary_gc104M.pkl"}
# The oldest transformers we claim (pyproject), the version Geneformer pins; its tokenizers comes with it.
OLDEST_TRANSFORMERS = "4.46.0"
# Real Ensembl ids: ENSG00000000419 is token 2 of a v1 vocabulary here, ENSG00000000457 token 3 (the id that a
# spurious "None" special token used to get).
GENES = [f"ENSG{n:011d}" for n in (3, 5, 419, 457, 460, 938, 971, 1036, 1084, 1167)] + [
    f"ENSG{1_000_000 + 7 * i:011d}" for i in range(50)
]


def write_vocab_dirs(root: Path) -> list[Path]:
    """v1 and v2 vocabularies of ``GENES``, plus Geneformer's official ones when ../shared has them."""
    dirs = [
        write_vocab_dir(build_token_dictionary(GENES, PRESETS[p]), root / p, max_length=PRESETS[p].max_length)
        for p in ("v1", "v2")
    ]
    if DICTIONARIES.is_dir():
        dirs += [
            write_vocab_dir(
                load_token_dictionary(DICTIONARIES / name),
                root / f"official_{preset}",
                max_length=PRESETS[preset].max_length,
            )
            for preset, name in OFFICIAL.items()
        ]
    return dirs


def test_vocab_dirs_give_dictionary_ids_on_installed_transformers(tmp_path):
    for directory in write_vocab_dirs(tmp_path):
        summary = hf_tokenizer_checks.check_vocab_dir(directory)
        assert summary.endswith("ok"), summary


@pytest.mark.network
def test_vocab_dirs_give_dictionary_ids_on_oldest_claimed_transformers(tmp_path):
    python = light_venv(f"transformers-{OLDEST_TRANSFORMERS}", [f"transformers=={OLDEST_TRANSFORMERS}"])
    dirs = write_vocab_dirs(tmp_path)
    output = run_checks(python, Path(hf_tokenizer_checks.__file__), *map(str, dirs))
    for directory in dirs:
        assert f"transformers {OLDEST_TRANSFORMERS}: {directory.name} (" in output, output
    assert output.count(") ok") == len(dirs), output
