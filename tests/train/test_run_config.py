"""run_dir/config.yaml: the resolved config of each start, which the report shows; never someone else's file."""

from __future__ import annotations

import pytest
import yaml
from geneformer_workflow.train import main
from geneformer_workflow.train.trainer import RUN_CONFIG_HEADER

from .conftest import FAST, compose

STEPS = ("training.max_steps=2", "checkpoint.save_every=2")


def test_each_start_writes_the_resolved_config_it_trained_with(small_corpus, tmp_path):
    main(compose(small_corpus, tmp_path, *FAST, *STEPS))
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith(RUN_CONFIG_HEADER)
    config = yaml.safe_load(text)
    assert config["training"]["max_steps"] == 2 and config["data"]["max_length"] == 256
    assert config["model"]["max_position_embeddings"] == 256  # resolved, not "${data.max_length}"
    main(compose(small_corpus, tmp_path, *FAST, "training.max_steps=4", "checkpoint.save_every=2"))  # resumes
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["training"]["max_steps"] == 4


def test_a_config_yaml_the_trainer_did_not_write_is_never_replaced(small_corpus, tmp_path):
    mine = "inputs: [my.h5ad]\n"
    (tmp_path / "config.yaml").write_text(mine)
    with pytest.raises(ValueError, match=r"config\.yaml exists and was not written by gfw train"):
        main(compose(small_corpus, tmp_path, *FAST, *STEPS))
    assert (tmp_path / "config.yaml").read_text() == mine
