from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.tokenize._pickle import load_plain_pickle
from geneformer_workflow.tokenize.h5ad import InputError
from geneformer_workflow.tokenize.median_table import read_gene_medians
from geneformer_workflow.tokenize.vocab import build_token_dictionary, load_token_dictionary, write_vocab_dir
from transformers import AutoTokenizer

from .cases import GENES, MEDIANS, run_gfw

DICTIONARIES = Path(__file__).resolve().parents[3] / "shared" / "geneformer-dictionaries"
DEMO = Path(__file__).resolve().parents[2] / "resources/demo/pbmc_5k_protein_v3.h5ad"


@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_vocab_dir_loads_in_transformers_with_geneformer_ids(tmp_path, preset):
    tokens = build_token_dictionary(GENES[::-1], PRESETS[preset])
    n_special = 4 if preset == "v2" else 2
    assert list(tokens)[:n_special] == list(PRESETS[preset].specials)
    assert [tokens[g] for g in GENES] == list(range(n_special, n_special + 4))
    write_vocab_dir(tokens, tmp_path / "vocab", max_length=PRESETS[preset].max_length)
    tok = AutoTokenizer.from_pretrained(tmp_path / "vocab")
    assert len(tok) == len(tokens)
    assert tok.convert_tokens_to_ids(GENES) == [tokens[g] for g in GENES]
    assert (tok.pad_token_id, tok.mask_token_id) == (0, 1)
    assert load_token_dictionary(tmp_path / "vocab") == tokens


def test_vocab_dir_holds_geneformer_median_pickle_of_the_dictionary_genes(tmp_path):
    tokens = build_token_dictionary(GENES[1:][::-1], PRESETS["v2"])  # GENES[0] gets no token
    medians = {g: float(m) for g, m in MEDIANS.items()} | {"ENSG00000009999": 3.0}
    vocab = write_vocab_dir(tokens, tmp_path / "vocab", max_length=4096, gene_medians=medians)
    path = vocab / "gene_median_dictionary.pkl"
    assert path.read_bytes()[:2] == b"\x80\x04"  # protocol 4, as token_dictionary.pkl
    with open(path, "rb") as fh:
        written = pickle.load(fh)
    # A plain dict of the token dictionary's genes (token id order), as Geneformer's TranscriptomeTokenizer takes.
    assert type(written) is dict
    assert list(written) == GENES[1:]
    assert all(type(k) is str and type(v) is float for k, v in written.items())
    assert written == {g: medians[g] for g in GENES[1:]}
    assert read_gene_medians(path) == written
    assert load_plain_pickle(vocab / "token_dictionary.pkl") == tokens


def test_vocab_dir_without_medians_has_no_median_pickle(tmp_path):
    vocab = write_vocab_dir(build_token_dictionary(GENES, PRESETS["v1"]), tmp_path / "vocab", max_length=2048)
    assert not (vocab / "gene_median_dictionary.pkl").exists()
    assert (vocab / "tokenizer.json").is_file()


def test_genes_without_a_median_are_left_out_with_a_warning(tmp_path, caplog):
    tokens = build_token_dictionary(GENES, PRESETS["v1"])
    with caplog.at_level("WARNING"):
        vocab = write_vocab_dir(tokens, tmp_path / "vocab", max_length=2048, gene_medians={GENES[2]: 0.5})
    assert load_plain_pickle(vocab / "gene_median_dictionary.pkl") == {GENES[2]: 0.5}
    assert "3 of 4 genes of the token dictionary have no gene median" in caplog.text


@pytest.mark.parametrize(
    ("medians", "match"),
    [
        ({"ENSG00000009999": 1.0}, "none of the 4 genes of the token dictionary has a gene median"),
        ({GENES[0]: 1.0, GENES[1]: 0.0}, r"1 gene medians are not positive finite .*ENSG00000000002=0.0\)"),
        ({GENES[0]: float("nan")}, "not positive finite"),
    ],
    ids=["no-common-gene", "zero", "nan"],
)
def test_bad_medians_are_refused_and_nothing_is_written(tmp_path, medians, match):
    tokens = build_token_dictionary(GENES, PRESETS["v1"])
    with pytest.raises(InputError, match=match):
        write_vocab_dir(tokens, tmp_path / "vocab", max_length=2048, gene_medians=medians)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing_dictionary", [False, True], ids=["built", "--token-dictionary"])
def test_gfw_vocab_writes_the_median_pickle(tmp_path, medians_tsv, existing_dictionary):
    extra = []
    if existing_dictionary:
        write_vocab_dir(build_token_dictionary(GENES[:2], PRESETS["v1"]), tmp_path / "given", max_length=2048)
        extra = ["--token-dictionary", tmp_path / "given" / "token_dictionary.pkl"]
    status, err = run_gfw("vocab", medians_tsv, "-o", tmp_path / "vocab", *extra)
    assert status == 0, err
    genes = GENES[:2] if existing_dictionary else GENES
    expected = {g: float(MEDIANS[g]) for g in genes}
    assert load_plain_pickle(tmp_path / "vocab" / "gene_median_dictionary.pkl") == expected


def test_export_ships_every_vocabulary_file(tmp_path):
    torch = pytest.importorskip("torch")
    from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig, save_hf_directory

    tokens = build_token_dictionary(GENES, PRESETS["v1"])
    medians = {g: float(m) for g, m in MEDIANS.items()}
    vocab = write_vocab_dir(tokens, tmp_path / "vocab", max_length=2048, gene_medians=medians)
    torch.manual_seed(0)
    config = ModelConfig.from_preset("sanity", vocab_size=len(tokens), max_position_embeddings=16)
    out = save_hf_directory(GeneformerForMaskedLM(config), tmp_path / "export", vocab_dir=vocab)
    names = {p.name for p in vocab.iterdir()}
    assert {"gene_median_dictionary.pkl", "token_dictionary.pkl", "tokenizer.json"} <= names
    assert names | {"config.json", "model.safetensors"} == {p.name for p in out.iterdir()}
    assert load_plain_pickle(out / "gene_median_dictionary.pkl") == medians
    assert AutoTokenizer.from_pretrained(out)(" ".join(GENES[::-1]))["input_ids"] == [5, 4, 3, 2]


@pytest.mark.reference
def test_geneformer_tokenizer_needs_only_the_vocab_dir_and_agrees_with_ours(tmp_path, pytestconfig):
    """Geneformer's TranscriptomeTokenizer (helical 2.2.0) with our vocab dir's two pickles gives our tokens."""
    pytest.importorskip("datasets")
    import anndata as ad
    import numpy as np
    import pyarrow.parquet as pq
    from geneformer_workflow.testing import load_reference_tokenizer_module
    from geneformer_workflow.tokenize.medians import read_medians, summarize_h5ad, write_medians_tsv
    from geneformer_workflow.tokenize.tokenizer import tokenize_h5ad

    write_medians_tsv(summarize_h5ad(DEMO).medians(), tmp_path / "gene_medians.tsv")
    medians = read_medians(tmp_path / "gene_medians.tsv")
    tokens = build_token_dictionary(medians.index, PRESETS["v2"])
    vocab = write_vocab_dir(tokens, tmp_path / "vocab", max_length=4096, gene_medians=medians.to_dict())
    tokenize_h5ad(DEMO, tmp_path / "ours.parquet", token_dictionary=tokens, gene_medians=medians, preset=PRESETS["v2"])
    ours = pq.read_table(tmp_path / "ours.parquet").column("input_ids").to_pylist()
    try:
        module = load_reference_tokenizer_module(pytestconfig.cache.mkdir("helical-2.2.0"))
    except RuntimeError as err:
        pytest.skip(str(err))
    reference = module.TranscriptomeTokenizer(
        model_input_size=4096,
        special_token=True,
        token_dictionary_file=vocab / "token_dictionary.pkl",
        gene_median_file=vocab / "gene_median_dictionary.pkl",
        gene_mapping_file=None,
        collapse_gene_ids=False,
    )
    adata = ad.read_h5ad(DEMO)
    adata.X = adata.X.astype(np.float64)  # the helical fork divides in the input dtype; Geneformer in float64
    adata.obs["n_counts"] = adata.obs["n_counts"].astype(np.float64)
    adata.var["ensembl_id"] = adata.var_names
    theirs = [[int(t) for t in cell] for cell in reference.tokenize_anndata(adata)[0]]
    theirs = [[tokens["<cls>"], *cell[:4094], tokens["<eos>"]] for cell in theirs]
    assert len(ours) == len(theirs) == adata.n_obs
    # The same tokens with the same value at every position: identical except the order inside groups of exactly
    # tied values (ours: ascending token id). With medians of a 200-cell corpus, every cell has such groups.
    pickled = load_plain_pickle(vocab / "gene_median_dictionary.pkl")
    inv_n = 1.0 / adata.obs["n_counts"].to_numpy()
    column = {tokens[g]: j for j, g in enumerate(adata.var_names) if g in pickled}
    inv_median = {tokens[g]: 1.0 / m for g, m in pickled.items()}
    counts = adata.X.toarray()
    for row, (mine, ref) in enumerate(zip(ours, theirs, strict=True)):
        # Geneformer's arithmetic, in its order; the special tokens have no value.
        values = [
            [((counts[row, column[t]] * inv_n[row]) * 10_000.0) * inv_median[t] for t in c[1:-1]] for c in (mine, ref)
        ]
        assert values[0] == values[1], f"cell {row}"
        assert sorted(mine) == sorted(ref), f"cell {row}"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "x": _Exploit()}))
    with pytest.raises(ValueError, match="refused to load global"):
        load_plain_pickle(path)
    with pytest.raises(ValueError, match="not a safe Geneformer dictionary"):
        load_token_dictionary(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(not DICTIONARIES.is_dir(), reason="Geneformer's dictionaries are not in ../shared")
@pytest.mark.parametrize(
    ("name", "size"), [("v1/token_dictionary_gc30M.pkl", 25_426), ("v2/token_dictionary_gc104M.pkl", 20_275)]
)
def test_official_geneformer_dictionaries_load_safely(name, size):
    tokens = load_token_dictionary(DICTIONARIES / name)
    assert len(tokens) == size
    assert all(isinstance(v, int) for v in tokens.values())
