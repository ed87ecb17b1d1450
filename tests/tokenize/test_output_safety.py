"""Outputs never destroy what a command did not create, and the files of one output appear together (issue 15).

Every case runs the real ``gfw`` command line in-process (``cli.main``) and checks the exit code, the one-line
message and that nothing else on disk changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from geneformer_workflow import atomic as _atomic
from geneformer_workflow.cli import main as gfw
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad
from geneformer_workflow.tokenize.corpus_index import read_dataset_index, resolve_corpus_inputs, verify_shard
from geneformer_workflow.tokenize.tokenizer import CorpusPaths
from geneformer_workflow.tokenize.vocab import build_token_dictionary, write_vocab_dir

GENES = [f"ENSG{i:011d}" for i in range(60)]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with an input file, gene medians and a vocabulary, as a user's project would hold them."""
    counts = synthetic_counts(40, len(GENES), genes_per_cell=25, seed=3).toarray()
    write_counts_h5ad(tmp_path / "in.h5ad", counts, GENES)
    medians = "ensembl_id\tmedian\n" + "".join(f"{g}\t{1 + i % 5}\n" for i, g in enumerate(GENES))
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "gene_medians.tsv").write_text(medians)
    write_vocab_dir(build_token_dictionary(GENES, PRESETS["v1"]), tmp_path / "ref" / "vocab", max_length=2048)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a checksum of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def tokenize(project: Path, out: Path | str, *extra: str) -> int:
    return gfw(
        [
            "tokenize",
            str(project / "in.h5ad"),
            str(out),
            "--token-dictionary",
            str(project / "ref" / "vocab"),
            "--gene-medians",
            str(project / "ref" / "gene_medians.tsv"),
            *extra,
        ]
    )


def refused(capsys, code: int, *words: str) -> str:
    """Assert a one-line refusal (exit 2) that contains ``words``; return it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    line = err[-1]
    assert line.startswith("gfw "), line
    for word in words:
        assert word in line, line
    return line


def test_existing_directory_as_tokenize_output_is_refused_and_kept(project, capsys):
    other = project / "results" / "tokenized" / "other_dataset"
    other.mkdir(parents=True)
    (other / "shard-0000.parquet").write_bytes(b"another dataset's shard")
    before = snapshot(project)
    refused(capsys, tokenize(project, project / "results" / "tokenized"), "is a directory", "tokenized")
    assert snapshot(project) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["default", "overwrite"])
def test_input_as_output_is_refused_even_with_overwrite(project, capsys, overwrite):
    before = snapshot(project)
    flag = ["--overwrite"] if overwrite else []
    refused(capsys, tokenize(project, project / "in.h5ad", *flag), "also an input")
    code = gfw(["qc", str(project / "in.h5ad"), "-o", str(project / "in.h5ad"), *flag])
    refused(capsys, code, "also an input")
    code = gfw(["qc", str(project / "in.h5ad"), "-o", str(project / "qc.tsv"), "--plot", str(project / "in.h5ad")])
    refused(capsys, code, "also an input")
    assert snapshot(project) == before


def test_an_existing_file_inside_an_input_directory_is_not_replaced_even_with_overwrite(project, capsys):
    """A vocabulary directory is an input: its files are never an output path, whatever the flags."""
    vocab = project / "ref" / "vocab"
    corpus = project / "corpus.parquet"
    assert tokenize(project, corpus) == 0
    before = snapshot(project)
    code = tokenize(project, vocab / "token_dictionary.json", "--overwrite")
    refused(capsys, code, "token_dictionary.json", "inside the input directory", str(vocab))
    code = gfw(
        ["store", "part", str(corpus), "-o", str(vocab / "tokenizer.json"), "--vocab-dir", str(vocab), "--overwrite"]
    )
    refused(capsys, code, "tokenizer.json", "inside the input directory", str(vocab))
    assert snapshot(project) == before
    assert tokenize(project, vocab / "new.parquet") == 0  # a new file there destroys nothing


def test_qc_into_a_directory_is_refused(project, capsys):
    (project / "qc").mkdir()
    (project / "qc" / "notes.txt").write_text("mine")
    before = snapshot(project)
    refused(capsys, gfw(["qc", str(project / "in.h5ad"), "-o", str(project / "qc")]), "is a directory")
    assert snapshot(project) == before


def test_vocab_into_the_directory_of_its_own_input_is_refused(project, capsys):
    before = snapshot(project)
    code = gfw(["vocab", str(project / "ref" / "gene_medians.tsv"), "-o", str(project / "ref"), "--overwrite"])
    refused(capsys, code, "holds the input", "gene_medians.tsv")
    assert snapshot(project) == before


def test_vocab_overwrite_replaces_a_vocabulary_but_not_a_folder_of_other_files(project, capsys):
    medians = str(project / "ref" / "gene_medians.tsv")
    refused(capsys, gfw(["vocab", medians, "-o", str(project / "ref" / "vocab")]), "already exists", "--overwrite")
    assert gfw(["vocab", medians, "-o", str(project / "ref" / "vocab"), "--overwrite", "--preset", "v2"]) == 0
    tokens = json.loads((project / "ref" / "vocab" / "token_dictionary.json").read_text())
    assert tokens["<cls>"] == 2  # the v2 vocabulary replaced the v1 one
    folder = project / "notes"
    folder.mkdir()
    (folder / "analysis.txt").write_text("not a vocabulary")
    before = snapshot(project)
    refused(capsys, gfw(["vocab", medians, "-o", str(folder), "--overwrite"]), "does not write", "analysis.txt")
    assert snapshot(project) == before


def test_existing_outputs_need_overwrite_and_are_then_replaced(project, capsys):
    out = project / "corpus.parquet"
    assert tokenize(project, out) == 0
    first = snapshot(project)
    refused(capsys, tokenize(project, out), "already exists", "--overwrite")
    assert snapshot(project) == first
    assert tokenize(project, out, "--overwrite", "--validation-fraction", "0.5") == 0
    assert json.loads(CorpusPaths.beside(out).manifest.read_text())["validation_fraction"] == 0.5
    verify_shard(out)


def test_rerun_on_unchanged_inputs_is_byte_identical(project):
    assert tokenize(project, project / "a" / "corpus.parquet") == 0
    assert tokenize(project, project / "b" / "corpus.parquet") == 0
    assert snapshot(project / "a") == snapshot(project / "b")


def test_outputs_without_parquet_suffix_get_their_own_side_files(project):
    assert tokenize(project, project / "out" / "donor.1", "--rows", "0:20") == 0
    assert tokenize(project, project / "out" / "donor.2", "--rows", "20:40") == 0
    for name in ("donor.1", "donor.2"):
        paths = CorpusPaths.beside(project / "out" / name)
        assert all(p.is_file() for p in paths.all())
        manifest = verify_shard(paths.parquet)
        assert manifest is not None and manifest["corpus"] == name
        assert manifest["n_cells"] == pq.read_metadata(paths.parquet).num_rows
    assert CorpusPaths.beside(project / "x.parquet").manifest.name == "x.manifest.json"


@pytest.mark.parametrize("column", ["split", "length", "cell_id", "input_ids"])
def test_obs_columns_that_collide_with_corpus_columns_are_refused(project, capsys, column):
    refused(capsys, tokenize(project, project / "c.parquet", "--obs-columns", column), repr(column), "own columns")
    assert not list(project.glob("c.*"))


def test_an_obs_column_listed_twice_is_refused(project, capsys):
    write_counts_h5ad(project / "in.h5ad", synthetic_counts(8, len(GENES), genes_per_cell=20).toarray(), GENES)
    refused(capsys, tokenize(project, project / "c.parquet", "--obs-columns", "n,n"), "more than once")


class Killed(BaseException):
    """Stands for SIGKILL arriving between two renames (BaseException: nothing may catch it)."""


def test_a_kill_between_renames_leaves_no_manifest_and_readers_refuse_the_shard(project, monkeypatch, capsys):
    out = project / "corpus.parquet"
    assert tokenize(project, out) == 0  # an earlier, complete run: its manifest must not outlive a partial rewrite
    real_replace = os.replace
    renamed: list[str] = []

    def replace(src, dst):
        if renamed:  # the second rename of the group: the machine dies here
            raise Killed
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", replace)
    with pytest.raises(Killed):
        tokenize(project, out, "--overwrite", "--validation-fraction", "0.5")
    monkeypatch.setattr(_atomic.os, "replace", real_replace)
    assert renamed == ["corpus.parquet"]
    assert not CorpusPaths.beside(out).manifest.exists(), "the old manifest now sits beside a new parquet"
    with pytest.raises(ValueError, match="incomplete corpus shard"):
        verify_shard(out)
    with pytest.raises(ValueError, match="incomplete corpus shard"):
        resolve_corpus_inputs([out])
    refused(capsys, gfw(["index", str(out), "-o", str(project / "dataset.json")]), "incomplete corpus shard")
    assert tokenize(project, out, "--overwrite") == 0  # the rerun repairs it
    verify_shard(out)


def test_a_manifest_of_another_write_is_refused(project):
    a, b = project / "a.parquet", project / "b.parquet"
    assert tokenize(project, a, "--rows", "0:10") == 0
    assert tokenize(project, b, "--rows", "10:20") == 0
    CorpusPaths.beside(a).manifest.write_bytes(CorpusPaths.beside(b).manifest.read_bytes())
    with pytest.raises(ValueError, match="describes another write"):
        verify_shard(a)


def test_dataset_index_lists_exactly_its_shards_and_names_stale_ones(project, caplog):
    shards = [project / "ds" / f"shard-{i:04d}.parquet" for i in range(2)]
    assert tokenize(project, shards[0], "--rows", "0:25") == 0
    assert tokenize(project, shards[1], "--rows", "25:40") == 0
    assert tokenize(project, project / "ds" / "shard-0002.parquet", "--rows", "0:5") == 0  # an earlier plan's
    assert gfw(["index", *map(str, shards), "-o", str(project / "ds" / "dataset.json")]) == 0
    assert "shard-0002.parquet" in caplog.text and "not used" in caplog.text
    index = read_dataset_index(project / "ds")
    assert [p.name for p in index.shards] == ["shard-0000.parquet", "shard-0001.parquet"]
    assert resolve_corpus_inputs([project / "ds"]) == list(index.shards)
    lengths = np.load(index.lengths_npy)
    expected = np.concatenate([np.load(CorpusPaths.beside(s).lengths_npy) for s in shards])
    assert lengths.tolist() == expected.tolist() == pickle.loads(index.lengths_pkl.read_bytes())
    assert index.info["n_cells"] == sum(pq.read_metadata(s).num_rows for s in shards) == lengths.size


def test_a_corpus_list_reads_exactly_the_datasets_it_names_relative_to_itself(project, capsys):
    """``datasets.txt`` (the workflow's list of its inputs' datasets) reads those, not a removed dataset's shards."""
    for name, rows in (("kept", "0:25"), ("removed", "25:40")):
        shard = project / "tokenized" / name / "shard-0000.parquet"
        assert tokenize(project, shard, "--rows", rows) == 0
        assert gfw(["index", str(shard), "-o", str(shard.parent / "dataset.json")]) == 0
    listing = project / "tokenized" / "datasets.txt"
    listing.write_text("kept/dataset.json\n\n")
    assert resolve_corpus_inputs([listing]) == [project / "tokenized" / "kept" / "shard-0000.parquet"]
    out = project / "kept.hf"
    assert gfw(["hf-dataset", str(listing), "--split", "all", "-o", str(out)]) == 0
    assert (
        pickle.loads((out / "lengths.pkl").read_bytes())
        == np.load(project / "tokenized" / "kept" / "dataset.lengths.npy").tolist()
    )
    listing.write_text("\n")
    with pytest.raises(ValueError, match=r"datasets\.txt: the corpus list names no dataset index"):
        resolve_corpus_inputs([listing])
    (project / "tokenized" / "other.txt").write_text("datasets.txt\n")
    listing.write_text("other.txt\n")  # lists naming lists could name each other: refused
    with pytest.raises(ValueError, match=r"may not name another list"):
        resolve_corpus_inputs([listing])
    listing.write_text("nope/dataset.json\n")
    with pytest.raises(ValueError, match=r"nope/dataset\.json"):
        resolve_corpus_inputs([listing])


def test_a_directory_without_index_is_not_globbed(project):
    assert tokenize(project, project / "ds" / "shard-0000.parquet") == 0
    with pytest.raises(ValueError, match=r"without dataset\.json"):
        resolve_corpus_inputs([project / "ds"])


def test_temporaries_of_a_live_writer_are_kept_and_of_a_dead_one_removed(tmp_path):
    target = tmp_path / "out.tsv"
    live = tmp_path / f".out.tsv.{_atomic._HOST}-{os.getpid()}.abc.tmp"
    dead = tmp_path / f".out.tsv.{_atomic._HOST}-999999999.abc.tmp"
    other_host = tmp_path / ".out.tsv.elsewhere-1.abc.tmp"
    for path in (live, dead, other_host):
        path.mkdir()
    _atomic.write_text_atomic(target, "x")
    assert live.exists() and other_host.exists() and not dead.exists()


def test_a_shard_without_write_id_cannot_be_indexed_and_the_message_says_how_to_redo_it(project, capsys):
    """A shard of an older gfw (no write id, so no way to tie it to its manifest) is refused by name."""
    out = project / "old" / "shard-0000.parquet"
    assert tokenize(project, out) == 0
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata(None), out)  # as the previous version wrote it
    code = gfw(["index", str(out), "-o", str(project / "old" / "dataset.json")])
    refused(capsys, code, "has no write id", "--forcerun tokenize_dataset")
    assert not (project / "old" / "dataset.json").exists()
