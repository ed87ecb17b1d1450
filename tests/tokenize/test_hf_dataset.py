"""``gfw hf-dataset``: one split of a corpus as a ``datasets`` directory that Geneformer's tools load."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from geneformer_workflow.cli import main
from geneformer_workflow.tokenize._pickle import RestrictedUnpickler
from geneformer_workflow.tokenize.hf_dataset import _IntListPickle, write_hf_dataset

from . import hf_dataset_check
from ._light_venv import light_venv
from .tokenized_dataset import write_tokenized_dataset

datasets = pytest.importorskip("datasets")
PACKAGE = Path(__file__).resolve().parents[2] / "workflow" / "scripts"
# datasets 3.x, which many Geneformer environments pin; h5py, scipy, pandas: the package's own imports
DATASETS_3 = ["datasets==3.6.0", "h5py", "scipy", "pandas"]
# The floor pyproject declares for datasets, on the project's pyarrow floor (datasets 2.19 predates numpy 2).
DATASETS_FLOOR = ["datasets==2.19.0", "pyarrow==16.0.0", "numpy<2", "h5py", "scipy", "pandas"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """40 cells in 2 shards (25 + 15), 12 of them validation cells, v2 preset (``<cls>`` ... ``<eos>``)."""
    return write_tokenized_dataset(tmp_path_factory.mktemp("hf"), preset="v2")


def _manifest_counts(shards: list[Path]) -> dict[str, int]:
    manifests = [json.loads(s.with_name(s.name.replace(".parquet", ".manifest.json")).read_text()) for s in shards]
    n_cells = sum(m["n_cells"] for m in manifests)
    n_validation = sum(m["n_validation"] for m in manifests)
    return {"all": n_cells, "validation": n_validation, "train": n_cells - n_validation}


def _corpus_rows(shards: list[Path], split: str) -> dict[str, list]:
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    rows = table.to_pydict()
    keep = [i for i, s in enumerate(rows["split"]) if split in ("all", s)]
    return {name: [values[i] for i in keep] for name, values in rows.items()}


@pytest.mark.parametrize("split", ["train", "validation", "all"])
def test_split_directory_loads_and_holds_exactly_its_rows(tokenized, tmp_path, split):
    out = tmp_path / f"{split}.dataset"
    assert main(["hf-dataset", str(tokenized.index), "--split", split, "-o", str(out)]) == 0
    dataset = datasets.load_from_disk(str(out))
    counts = _manifest_counts(tokenized.shards)
    assert 0 < counts["validation"] < counts["train"]  # the fixture has both splits, so the filter is tested
    assert dataset.num_rows == counts[split]
    expected = _corpus_rows(tokenized.shards, split)
    assert dataset.column_names == ["input_ids", "length", "cell_id", "split", "cell_type"]
    for name in dataset.column_names:
        assert dataset[name] == expected[name], name  # every column, in corpus order
    assert set(dataset["split"]) == ({"train", "validation"} if split == "all" else {split})
    assert dataset.features["length"] == datasets.Value("int64")
    assert dataset.features["input_ids"].feature == datasets.Value("int64")  # as Geneformer's tokenizer writes
    with open(out / "lengths.pkl", "rb") as fh:
        lengths = RestrictedUnpickler(fh).load()  # plain list of ints: no global needed
    assert lengths == dataset["length"] == [len(ids) for ids in dataset["input_ids"]]


def test_dataset_works_as_geneformers_tools_use_it(tokenized, tmp_path):
    torch = pytest.importorskip("torch")
    out = tmp_path / "train.dataset"
    assert main(["hf-dataset", str(tokenized.index.parent), "--split", "train", "-o", str(out)]) == 0
    dataset = datasets.load_from_disk(str(out))
    # EmbExtractor: downsample_and_sort sorts by length, then set_format("torch") and batches of input_ids
    ordered = dataset.sort("length", reverse=True)
    ordered.set_format(type="torch")
    batch = ordered.select(range(3))
    assert batch["input_ids"][0].dtype == torch.int64
    assert int(batch["length"][0]) == max(dataset["length"])
    assert all(int(ids[0]) == tokenized.tokens["<cls>"] for ids in batch["input_ids"])
    # the pretrainer: example_lengths_file lists one length per row, in dataset order
    with open(out / "lengths.pkl", "rb") as fh:
        assert pickle.load(fh) == dataset["length"]


def test_rows_do_not_depend_on_chunk_size_and_int32_is_available(tokenized, tmp_path):
    small = write_hf_dataset([tokenized.index], tmp_path / "small", split="train", chunk_rows=4)
    large = write_hf_dataset(tokenized.shards, tmp_path / "large", split="train", token_dtype="int32")
    assert small.n_rows == large.n_rows == _manifest_counts(tokenized.shards)["train"]
    a, b = datasets.load_from_disk(str(tmp_path / "small")), datasets.load_from_disk(str(tmp_path / "large"))
    assert a["input_ids"] == b["input_ids"] and a["cell_id"] == b["cell_id"]
    assert b.features["input_ids"].feature == datasets.Value("int32")
    assert small.n_tokens == sum(a["length"])


def test_only_the_shards_the_index_lists_are_read(tokenized, tmp_path):
    stale = tokenized.index.parent / "shard-0099.parquet"  # e.g. left by a run with another shard size
    stale.write_bytes(tokenized.shards[0].read_bytes())
    try:
        stats = write_hf_dataset([tokenized.index.parent], tmp_path / "out", split="all")
    finally:
        stale.unlink()
    assert stats.shards == tuple(tokenized.shards)
    assert stats.n_rows == json.loads(tokenized.index.read_text())["n_cells"]


def test_outputs_are_safe_existing_needs_overwrite_inputs_and_other_files_are_kept(tokenized, tmp_path, capsys):
    out = tmp_path / "train.dataset"
    argv = ["hf-dataset", str(tokenized.index), "--split", "train", "-o", str(out)]
    assert main(argv) == 0
    first = sorted(p.name for p in out.iterdir())
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == first
    (out / "data-00007-of-00009.arrow").write_bytes(b"")  # an earlier output of a larger split had more files
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == first
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == 2
    assert "holds files this command does not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    inside = ["hf-dataset", str(tokenized.index), "--split", "train", "-o", str(tokenized.index.parent)]
    assert main([*inside, "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_corpus_problems_are_named_and_leave_no_output(tokenized, tmp_path, capsys):
    foreign = tmp_path / "mine.parquet"  # a user's own parquet: no write id, so no manifest is expected
    pq.write_table(_without_write_id(tokenized.shards[0]).drop_columns(["split"]), foreign)
    out = tmp_path / "out"
    assert main(["hf-dataset", str(foreign), "--split", "train", "-o", str(out)]) == 2
    assert "mine.parquet: has no column(s) ['split']" in capsys.readouterr().err
    other = tmp_path / "other.parquet"
    pq.write_table(_without_write_id(tokenized.shards[1]).drop_columns(["cell_type"]), other)
    assert main(["hf-dataset", str(foreign), str(other), "--split", "all", "-o", str(out)]) == 2
    assert "differ from those of" in capsys.readouterr().err
    incomplete = tmp_path / "shard-0000.parquet"
    incomplete.write_bytes(tokenized.shards[0].read_bytes())  # its manifest is missing: a killed tokenize run
    assert main(["hf-dataset", str(incomplete), "--split", "train", "-o", str(out)]) == 2
    assert "incomplete corpus shard" in capsys.readouterr().err
    assert main(["hf-dataset", str(tmp_path / "nothing"), "--split", "train", "-o", str(out)]) == 2
    assert "no such corpus file, dataset index or directory" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["hf-dataset", str(tokenized.index), "-o", str(out)])  # --split is required: no silent mixing
    assert "--split" in capsys.readouterr().err


@pytest.mark.network
def test_datasets_3_writes_a_directory_it_loads_but_cannot_load_what_datasets_4_writes(tokenized, tmp_path):
    """Why the docs say "run it where Geneformer runs": the `List` feature type of datasets >= 4."""
    newer = tmp_path / "newer"
    write_hf_dataset([tokenized.index], newer, split="train")
    python = light_venv("datasets-3.6.0", DATASETS_3)
    command = [str(python), hf_dataset_check.__file__, str(tokenized.index), str(tmp_path / "older"), str(newer)]
    env = os.environ | {"PYTHONPATH": str(PACKAGE)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["datasets"] == "3.6.0" and result["exit"] == 0
    assert result["written"]["input_ids"] == datasets.load_from_disk(str(newer))["input_ids"]
    assert result["written"]["rows"] == _manifest_counts(tokenized.shards)["train"]
    if int(datasets.__version__.split(".")[0]) >= 4:
        assert "Feature type 'List' not found" in result["other"]["error"]


def test_the_datasets_floor_tested_here_is_the_one_pyproject_declares():
    pyproject = (PACKAGE.parents[1] / "pyproject.toml").read_text()
    assert '"datasets>=2.19"' in pyproject and DATASETS_FLOOR[0] == "datasets==2.19.0"


@pytest.mark.network
def test_hf_dataset_runs_on_the_declared_datasets_floor(tokenized, tmp_path):
    python = light_venv("datasets-2.19.0", DATASETS_FLOOR)
    ours = tmp_path / "ours"
    write_hf_dataset([tokenized.index], ours, split="train")
    command = [str(python), hf_dataset_check.__file__, str(tokenized.index), str(tmp_path / "floor"), str(ours)]
    env = os.environ | {"PYTHONPATH": str(PACKAGE)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["datasets"] == "2.19.0" and result["exit"] == 0
    assert result["written"]["columns"][:2] == ["input_ids", "length"]
    assert result["written"]["input_ids"] == datasets.load_from_disk(str(ours))["input_ids"]
    assert result["written"]["rows"] == _manifest_counts(tokenized.shards)["train"]
    lengths = RestrictedUnpickler(io.BytesIO((tmp_path / "floor" / "lengths.pkl").read_bytes())).load()
    assert lengths == datasets.load_from_disk(str(ours))["length"]


def _without_write_id(shard: Path) -> pa.Table:
    return pq.read_table(shard).replace_schema_metadata(None)


@pytest.mark.parametrize(
    "pieces", [[], [[]], [[7]], [[1, 2, 3], [], [4096, 0, 2**31 - 1, -5]]], ids=["none", "empty", "one", "several"]
)
def test_streamed_lengths_pickle_loads_as_the_list(pieces):
    buffer = io.BytesIO()
    pickled = _IntListPickle(buffer)
    for piece in pieces:
        pickled.extend(np.array(piece, dtype=np.int64))
    pickled.close()
    expected = [value for piece in pieces for value in piece]
    assert pickle.loads(buffer.getvalue()) == expected
    assert RestrictedUnpickler(io.BytesIO(buffer.getvalue())).load() == expected
    pickletools.dis(buffer.getvalue(), out=io.StringIO())  # a well-formed pickle, opcode by opcode
    with pytest.raises(ValueError, match="32 bits"):
        pickled.extend(np.array([2**31]))
