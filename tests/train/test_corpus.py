"""``data.corpus`` → a training store under ``data.cache_dir`` (built by the run itself)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from geneformer_workflow.tokenize.store import open_store
from geneformer_workflow.train.corpus import build_cache, resolve_corpus_files

SPLITS = {"train": "train", "validation": "validation"}


def test_cache_holds_every_cell_of_each_split_in_corpus_order(small_corpus, tmp_path):
    cache = build_cache(small_corpus.files, tmp_path, SPLITS)
    tables = [pq.read_table(p) for p in small_corpus.files]
    for role in ("train", "validation"):
        expected = [
            np.asarray(ids, dtype=np.int32)
            for t in tables
            for ids, split in zip(t["input_ids"].to_pylist(), t["split"].to_pylist(), strict=True)
            if split == role
        ]
        split = getattr(open_store(cache, vocab_size=10_000), role)
        assert len(split) == len(expected)
        assert all(np.array_equal(split.cell(i), cell) for i, cell in enumerate(expected))
        assert np.array_equal(split.lengths(np.arange(len(split))), [len(c) for c in expected])


def test_cache_is_reused_and_rebuilt_when_a_file_changes(small_corpus, tmp_path):
    files = [tmp_path / f.name for f in small_corpus.files]
    for src, dst in zip(small_corpus.files, files, strict=True):
        dst.write_bytes(src.read_bytes())
    first = build_cache(files, tmp_path / "cache", SPLITS)
    assert build_cache(files, tmp_path / "cache", SPLITS) == first
    pq.write_table(pq.read_table(files[0]).slice(0, 10), files[0])
    assert build_cache(files, tmp_path / "cache", SPLITS) != first


def test_directories_and_globs_expand_to_sorted_parquet_files(small_corpus):
    folder = small_corpus.files[0].parent
    assert resolve_corpus_files([str(folder)]) == sorted(small_corpus.files)
    assert resolve_corpus_files(str(folder / "part-*.parquet")) == sorted(small_corpus.files)


def test_missing_corpus_entry_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=re.escape("data.corpus entry")):
        resolve_corpus_files([str(tmp_path / "nothing*.parquet")])


def test_length_column_must_match_the_token_lists(tmp_path):
    path = tmp_path / "bad.parquet"
    ids = pa.array([[5, 6, 7]], type=pa.list_(pa.int32()))
    table = pa.table({"input_ids": ids, "length": pa.array([4], pa.int32())})
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="length"):
        build_cache([path], tmp_path / "cache", SPLITS)


def test_token_ids_beyond_the_vocabulary_are_refused(small_corpus, tmp_path):
    cache = build_cache(small_corpus.files, tmp_path, SPLITS)
    with pytest.raises(ValueError, match=re.escape("data.vocab_dir")):
        open_store(cache, vocab_size=100)
