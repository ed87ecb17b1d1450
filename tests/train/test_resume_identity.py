"""A run never continues a checkpoint trained on other data (issue 15).

Checkpoints record the vocabulary's checksum and a checksum of the corpus content (every cell's tokens, both
splits); a resume on other cells, the same files with other counts, or another vocabulary is refused with the
way to start over, before any weight is loaded.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from geneformer_workflow.train import main
from geneformer_workflow.train.checkpoint import META_FILE, latest_checkpoint
from geneformer_workflow.train.corpus import content_sha256
from geneformer_workflow.train.trainer import CheckpointMismatchError

from .conftest import Corpus, compose, write_vocab

RUN = ("training.max_steps=2", "checkpoint.save_every=2", "scheduler.decay_steps=4")


def copy_corpus(corpus: Corpus, directory, *, change_one_cell: bool = False) -> Corpus:
    """A copy of ``corpus`` (same cells, counts and order); optionally one cell's top two genes swapped."""
    directory.mkdir()
    files = []
    for k, path in enumerate(corpus.files):
        table = pq.read_table(path)
        if change_one_cell and k == 0:
            cells = table.column("input_ids").to_pylist()
            cells[0][0], cells[0][1] = cells[0][1], cells[0][0]  # same genes and length, another order
            table = table.set_column(0, "input_ids", pa.array(cells, type=pa.list_(pa.int32())))
        files.append(directory / path.name)
        pq.write_table(table, files[-1])
    return Corpus(files=files, vocab_dir=corpus.vocab_dir)


@pytest.fixture
def trained(small_corpus, tmp_path):
    """A finished two-step run on a copy of the small corpus."""
    corpus = copy_corpus(small_corpus, tmp_path / "corpus")
    run_dir = tmp_path / "run"
    main(compose(corpus, run_dir, *RUN, f"data.cache_dir={tmp_path / 'cache'}"))
    return corpus, run_dir


def test_checkpoints_record_the_corpus_and_vocabulary_checksums(trained):
    _, run_dir = trained
    meta = json.loads((latest_checkpoint(run_dir) / META_FILE).read_text())
    assert len(meta["corpus_sha256"]) == 64 and len(meta["token_dictionary_sha256"]) == 64


def test_resume_on_the_same_cells_in_a_copied_corpus_continues(trained, tmp_path, caplog):
    """The checksum is of content, not of paths or times: a moved or copied corpus is the same data."""
    corpus, run_dir = trained
    copy = copy_corpus(corpus, tmp_path / "copy")
    with caplog.at_level(logging.INFO):
        main(compose(copy, run_dir, *RUN[1:], "training.max_steps=4", f"data.cache_dir={tmp_path / 'cache2'}"))
    assert "resumed from" in caplog.text and latest_checkpoint(run_dir).name == "step_4"


def test_resume_on_changed_cells_is_refused_with_the_way_to_start_over(trained, tmp_path):
    corpus, run_dir = trained
    changed = copy_corpus(corpus, tmp_path / "changed", change_one_cell=True)
    with pytest.raises(CheckpointMismatchError, match="trained on other data") as info:
        main(compose(changed, run_dir, *RUN[1:], "training.max_steps=4", f"data.cache_dir={tmp_path / 'c'}"))
    assert f"mv {run_dir}" in str(info.value)
    assert latest_checkpoint(run_dir).name == "step_2"  # nothing trained, nothing deleted


def test_resume_with_another_vocabulary_names_the_vocabulary_not_a_size_mismatch(trained, tmp_path):
    corpus, run_dir = trained
    v2 = Corpus(files=corpus.files, vocab_dir=write_vocab(tmp_path / "v2vocab", v2=True))
    with pytest.raises(CheckpointMismatchError, match="the vocabulary changed") as info:
        main(compose(v2, run_dir, *RUN[1:], "training.max_steps=4", f"data.cache_dir={tmp_path / 'c'}"))
    assert "Size mismatch" not in str(info.value) and "tokenize.preset" in str(info.value)


def test_a_checkpoint_without_checksums_resumes_with_a_warning(trained, tmp_path, caplog):
    """Checkpoints written before the checksums existed still resume (nothing to compare against)."""
    corpus, run_dir = trained
    meta_file = latest_checkpoint(run_dir) / META_FILE
    meta = json.loads(meta_file.read_text())
    del meta["corpus_sha256"], meta["token_dictionary_sha256"]
    meta_file.write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        main(compose(corpus, run_dir, *RUN[1:], "training.max_steps=4", f"data.cache_dir={tmp_path / 'cache'}"))
    assert "predates corpus and vocabulary checksums" in caplog.text


def test_content_checksum_covers_order_and_boundaries():
    tokens = np.arange(6, dtype=np.int32)
    base = content_sha256(tokens, np.array([0, 3, 6]))
    assert base == content_sha256(tokens.copy(), np.array([0, 3, 6]))
    assert base != content_sha256(tokens, np.array([0, 2, 6]))  # same tokens, other cells
    assert base != content_sha256(tokens[::-1].copy(), np.array([0, 3, 6]))
    assert base == content_sha256(tokens, np.array([0, 3, 6]), block=4)  # blocks do not change the digest
