from __future__ import annotations

import pytest
import torch
from geneformer_workflow.train import main
from geneformer_workflow.train.export import export_checkpoint, load_checkpoint_model

from .conftest import compose

FROZEN = ("optimizer.lr=0.0", "optimizer.weight_decay=0.0", "training.max_steps=1")


@pytest.fixture(scope="module")
def pretrained(small_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained")
    main(compose(small_corpus, run, "training.max_steps=2"))
    hf_dir = export_checkpoint(run, tmp_path_factory.mktemp("export") / "model")
    return run, hf_dir


def weights(run_dir):
    return load_checkpoint_model(run_dir)[0].state_dict()


@pytest.mark.parametrize("source", ["hf", "ours"])
def test_fresh_run_starts_from_the_given_weights(small_corpus, pretrained, tmp_path, source):
    run, hf_dir = pretrained
    path = hf_dir if source == "hf" else run
    main(compose(small_corpus, tmp_path, *FROZEN, f"model.init_from={path}"))
    started, expected = weights(tmp_path), weights(run)
    assert started.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(started[key], expected[key], rtol=0, atol=0, msg=key)


def test_architecture_mismatch_names_the_keys(small_corpus, pretrained, tmp_path):
    _, hf_dir = pretrained
    with pytest.raises(ValueError, match=r"hidden_size: checkpoint \d+ vs config 32"):
        main(compose(small_corpus, tmp_path, *FROZEN, "model.hidden_size=32", f"model.init_from={hf_dir}"))


def test_missing_init_from_directory_is_an_error(small_corpus, tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        main(compose(small_corpus, tmp_path, *FROZEN, f"model.init_from={tmp_path / 'nope'}"))
