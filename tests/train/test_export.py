"""Export: a (sharded) checkpoint becomes a Hugging Face BertForMaskedLM with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from geneformer_workflow.train.export import cli_main, export_checkpoint, load_checkpoint_model


@pytest.mark.slow
def test_exported_fsdp2_checkpoint_loads_in_transformers_with_the_same_logits(fsdp2_run, small_corpus, tmp_path):
    out = export_checkpoint(fsdp2_run, tmp_path / "hf")
    hf = transformers.BertForMaskedLM.from_pretrained(out).eval()
    ours, meta = load_checkpoint_model(fsdp2_run)
    assert meta["world_size"] == 2 and meta["backend"] == "fsdp2"
    ids = torch.randint(2, ours.config.vocab_size, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    ids[1, 25:] = 0
    with torch.no_grad():
        expected = ours(ids, mask).logits
        got = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    assert (out / "token_dictionary.json").is_file()  # the vocab dir recorded at training time is shipped


@pytest.mark.slow
def test_export_cli_takes_a_step_directory_and_a_vocab_dir(fsdp2_run, small_corpus, tmp_path):
    step_dir = fsdp2_run / json.loads((fsdp2_run / "final.json").read_text())["checkpoint"]
    assert cli_main([str(step_dir), str(tmp_path / "hf"), "--vocab-dir", str(small_corpus.vocab_dir)]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["hidden_act"] == "relu"


def test_export_of_a_directory_without_checkpoints_fails_cleanly(tmp_path, capsys):
    assert cli_main([str(tmp_path), str(tmp_path / "out")]) == 1
    assert "neither a checkpoint" in capsys.readouterr().out
