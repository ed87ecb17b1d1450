"""The training store: one part per shard in one pass, an index over them, opened (never built) by training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from geneformer_workflow.tokenize.h5ad import InputError
from geneformer_workflow.tokenize.store import (
    INDEX_NAME,
    SplitValues,
    build_store,
    open_store,
    part_paths,
    write_index,
    write_part,
)
from geneformer_workflow.train import compose_config, main
from geneformer_workflow.train.checkpoint import META_FILE, latest_checkpoint
from geneformer_workflow.train.corpus import build_cache
from geneformer_workflow.train.trainer import CheckpointMismatchError

from .conftest import FAST, subprocess_env, train_losses

VOCAB = 3_002  # conftest's vocabulary: 2 special tokens + 3,000 genes


def expected_cells(files, role):
    """The cells of ``role`` in corpus order, read straight from the parquet files."""
    return [
        np.asarray(ids, dtype=np.int32)
        for path in files
        for ids, split in zip(*pq.read_table(path, columns=["input_ids", "split"]).to_pydict().values(), strict=True)
        if split == role
    ]


@pytest.fixture
def store_dir(small_corpus, tmp_path):
    (tmp_path / "store").mkdir()
    build_store(small_corpus.files, tmp_path / "store", vocab_size=VOCAB)
    return tmp_path / "store"


def test_each_split_holds_exactly_its_cells_in_corpus_order_as_uint16(small_corpus, store_dir):
    store = open_store(store_dir, vocab_size=VOCAB, splits=SplitValues())
    for role in ("train", "validation"):
        split, expected = getattr(store, role), expected_cells(small_corpus.files, role)
        assert len(split) == len(expected) > 0
        assert all(np.array_equal(split.cell(i), cell) for i, cell in enumerate(expected))
        assert np.array_equal(split.lengths(np.arange(len(split))[::-1]), [len(c) for c in expected[::-1]])
        assert split.argmax() == int(np.argmax([len(c) for c in expected]))
    tokens = np.load(store_dir / "part-00000.tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.uint16
    info = json.loads((store_dir / INDEX_NAME).read_text())
    n_tokens = info["train"]["tokens"] + info["validation"]["tokens"]
    assert sum(p.stat().st_size for p in store_dir.iterdir()) / n_tokens < 2.6  # tiny cells: offsets weigh more


def test_rows_of_other_splits_are_left_out_and_a_file_without_split_is_all_train(tmp_path):
    ids = pa.array([[5, 6], [7], [8, 9, 10], [11]], type=pa.list_(pa.int32()))
    lengths = pa.array([2, 1, 3, 1], pa.int32())
    pq.write_table(pa.table({"input_ids": ids, "length": lengths, "split": ["test", "validation", "train", None]}),
                   tmp_path / "a.parquet")  # fmt: skip
    pq.write_table(pa.table({"input_ids": ids, "length": lengths}), tmp_path / "b.parquet")
    (tmp_path / "s").mkdir()
    build_store([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "s", vocab_size=100)
    store = open_store(tmp_path / "s")
    assert [store.train.cell(i).tolist() for i in range(len(store.train))] == [
        [8, 9, 10],
        [5, 6],
        [7],
        [8, 9, 10],
        [11],
    ]
    assert [store.validation.cell(0).tolist()] == [[7]] and len(store.validation) == 1


def test_a_large_vocabulary_stores_int32(small_corpus, tmp_path):
    info = write_part(small_corpus.files[0], tmp_path / "p.json", vocab_size=70_000)
    assert info["token_dtype"] == "int32"
    assert np.load(tmp_path / "p.tokens.npy").dtype == np.int32


def test_the_identity_is_of_content_not_paths(small_corpus, store_dir, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(store_dir, moved)
    assert open_store(moved).content_sha256 == open_store(store_dir).content_sha256
    assert "/" not in "".join(p["path"] for p in json.loads((moved / INDEX_NAME).read_text())["parts"])
    # the store built by a run from data.corpus holds the same cells with the same identity
    cache = build_cache(small_corpus.files, tmp_path / "cache", SplitValues().as_dict(), vocab_size=VOCAB)
    assert open_store(cache).content_sha256 == open_store(store_dir).content_sha256
    # another cell order is other data
    (tmp_path / "reversed").mkdir()
    build_store(small_corpus.files[::-1], tmp_path / "reversed", vocab_size=VOCAB)
    assert open_store(tmp_path / "reversed").content_sha256 != open_store(store_dir).content_sha256


def test_a_missing_or_short_part_and_a_missing_index_are_named(store_dir, tmp_path):
    with pytest.raises(InputError, match="no training store here; build it"):
        open_store(tmp_path / "nowhere")
    tokens = store_dir / "part-00001.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(InputError, match=r"part-00001\.tokens\.npy is missing or not the recorded size"):
        open_store(store_dir)
    tokens.unlink()
    with pytest.raises(InputError, match=r"part-00001\.tokens\.npy is missing"):
        open_store(store_dir / INDEX_NAME)


def test_ids_outside_the_vocabulary_and_bad_lengths_are_refused_without_output(small_corpus, tmp_path):
    with pytest.raises(InputError, match="outside the vocabulary of 100 ids"):
        write_part(small_corpus.files[0], tmp_path / "p.json", vocab_size=100)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[5, 6, 7]]), "length": pa.array([4], pa.int32())}), bad)
    with pytest.raises(InputError, match="length"):
        write_part(bad, tmp_path / "q.json", vocab_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]


def test_the_index_refuses_parts_of_another_vocabulary_or_split(small_corpus, tmp_path):
    write_part(small_corpus.files[0], tmp_path / "a.json", vocab_size=VOCAB)
    write_part(small_corpus.files[1], tmp_path / "b.json", vocab_size=VOCAB, splits=SplitValues(validation="val"))
    with pytest.raises(InputError, match="disagree on splits"):
        write_index([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / INDEX_NAME)
    assert not (tmp_path / INDEX_NAME).exists()


def test_the_training_split_values_must_match_the_store(store_dir):
    with pytest.raises(InputError, match=r"data\.train_split/data\.validation_split"):
        open_store(store_dir, splits=SplitValues(validation="heldout"))


def gfw(*args):
    return subprocess.run([sys.executable, "-m", "geneformer_workflow", *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_gfw_store_part_index_and_build_give_the_same_store(small_corpus, tmp_path):
    parts = [tmp_path / "w" / f"shard-{k}.json" for k in range(len(small_corpus.files))]
    for shard, part in zip(small_corpus.files, parts, strict=True):
        assert gfw("store", "part", shard, "-o", part, "--vocab-dir", small_corpus.vocab_dir).returncode == 0
    listing = tmp_path / "parts.txt"
    listing.write_text("".join(f"{p}\n" for p in parts))
    proc = gfw("store", "index", "--parts-list", listing, "-o", tmp_path / "w" / INDEX_NAME)
    assert proc.returncode == 0, proc.stderr
    proc = gfw(
        "store", "build", small_corpus.files[0].parent, "-o", tmp_path / "b", "--vocab-dir", small_corpus.vocab_dir
    )
    assert proc.returncode == 0, proc.stderr
    assert open_store(tmp_path / "w").content_sha256 == open_store(tmp_path / "b").content_sha256
    again = gfw("store", "build", small_corpus.files[0], "-o", tmp_path / "b", "--vocab-dir", small_corpus.vocab_dir)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing store is never replaced silently
    assert all(p.is_file() for part in parts for p in part_paths(part))


def test_training_on_a_store_matches_training_on_the_corpus(small_corpus, store_dir, tmp_path):
    """The same cells in the same order: a run given data.store and one given data.corpus train identically."""
    common = [f"data.vocab_dir={small_corpus.vocab_dir}", *FAST, "training.max_steps=3"]
    main(compose_config("sanity", [f"data.store={store_dir / INDEX_NAME}", f"run_dir={tmp_path / 'a'}", *common]))
    main(compose_config("sanity", [small_corpus.corpus_override, f"run_dir={tmp_path / 'b'}", *common]))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert not (tmp_path / "a" / "cache").exists()  # a run on a store builds nothing


def test_store_and_corpus_together_or_neither_is_a_config_error(small_corpus, store_dir, tmp_path):
    base = [f"data.vocab_dir={small_corpus.vocab_dir}", f"run_dir={tmp_path / 'r'}", *FAST]
    both = [f"data.store={store_dir}", small_corpus.corpus_override]
    for extra, problem in ((both, "both are set"), ([], "neither is set")):
        with pytest.raises(ValueError, match=f"set exactly one of data.store and data.corpus \\({problem}\\)"):
            main(compose_config("sanity", [*base, *extra]))


def test_a_checkpoint_of_the_older_data_order_is_not_resumed(small_corpus, store_dir, tmp_path):
    overrides = [f"data.store={store_dir}", f"data.vocab_dir={small_corpus.vocab_dir}", f"run_dir={tmp_path / 'r'}",
                 *FAST, "checkpoint.save_every=2"]  # fmt: skip
    main(compose_config("sanity", [*overrides, "training.max_steps=2"]))
    meta_file = latest_checkpoint(tmp_path / "r") / META_FILE
    meta = json.loads(meta_file.read_text())
    assert meta["data_order"] == 2
    del meta["data_order"]  # as written before the training store
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match="data order version 1"):
        main(compose_config("sanity", [*overrides, "training.max_steps=4"]))
