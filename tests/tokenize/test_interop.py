"""Our outputs in the tools users already have: Hugging Face `datasets` and Geneformer's pickles."""

from __future__ import annotations

from pathlib import Path

import pytest
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.tokenize._pickle import load_plain_pickle
from geneformer_workflow.tokenize.medians import read_medians, summarize_h5ad, write_medians_tsv
from geneformer_workflow.tokenize.tokenizer import tokenize_h5ad
from geneformer_workflow.tokenize.vocab import build_token_dictionary, load_token_dictionary, write_vocab_dir

DEMO = Path(__file__).resolve().parents[2] / "resources/demo/pbmc_5k_protein_v3.h5ad"


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    write_medians_tsv(summarize_h5ad(DEMO).medians(), root / "gene_medians.tsv")
    medians = read_medians(root / "gene_medians.tsv")
    vocab = write_vocab_dir(build_token_dictionary(medians.index, PRESETS["v2"]), root / "vocab", max_length=4096)
    for i, rows in enumerate([(0, 120), (120, 200)]):
        tokenize_h5ad(
            DEMO,
            root / f"corpus/shard-{i:04d}.parquet",
            token_dictionary=load_token_dictionary(vocab),
            gene_medians=medians,
            preset=PRESETS["v2"],
            rows=rows,
        )
    return root


def test_corpus_loads_as_a_hugging_face_dataset_in_one_line(demo_corpus):
    datasets = pytest.importorskip("datasets")
    # The documented one-liner (docs/tokenization.md):
    dataset = datasets.Dataset.from_parquet(str(demo_corpus / "corpus" / "shard-*.parquet"))
    assert dataset.num_rows == 200
    assert {"input_ids", "length", "cell_id", "split"} <= set(dataset.column_names)
    first = dataset[0]
    assert len(first["input_ids"]) == first["length"]
    assert first["input_ids"][0] == 2 and first["input_ids"][-1] == 3  # <cls> ... <eos>


def test_vocab_dir_has_geneformers_pickled_token_dictionary(demo_corpus):
    pickled = load_plain_pickle(demo_corpus / "vocab" / "token_dictionary.pkl")
    assert pickled == load_token_dictionary(demo_corpus / "vocab")
    assert pickled["<pad>"] == 0 and pickled["<mask>"] == 1 and pickled["<cls>"] == 2 and pickled["<eos>"] == 3
