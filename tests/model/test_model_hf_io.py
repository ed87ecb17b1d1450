"""Export to and import from Hugging Face ``BertForMaskedLM`` directories."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from geneformer_workflow.model import GeneformerForMaskedLM, load_hf_directory, save_hf_directory
from geneformer_workflow.model import hf as hf_io
from safetensors.torch import load_file, save_file


def test_exported_directory_loads_in_transformers_with_no_missing_keys_and_same_logits(
    random_model, padded_batch, tol, tmp_path
):
    out = save_hf_directory(random_model, tmp_path / "export")
    hf, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    b = padded_batch
    with torch.no_grad():
        ours = random_model(b.input_ids, b.attention_mask).logits
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    real = b.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=tol.logits_atol, rtol=tol.logits_rtol)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    assert config["hidden_act"] == "relu"


def test_export_writes_the_same_keys_as_transformers_save_pretrained(random_model, hf_twin, tmp_path):
    save_hf_directory(random_model, tmp_path / "ours")
    hf_twin(random_model).save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_hf_to_ours_to_hf_round_trip_is_bit_identical(hf_twin, random_model, tmp_path):
    hf_twin(random_model).save_pretrained(tmp_path / "hf")
    model = load_hf_directory(tmp_path / "hf")
    assert not model.training
    save_hf_directory(model, tmp_path / "again")
    before = load_file(tmp_path / "hf" / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key], tensor), key
    before_cfg = transformers.BertConfig.from_pretrained(tmp_path / "hf").to_dict()
    after_cfg = transformers.BertConfig.from_pretrained(tmp_path / "again").to_dict()
    assert {k: v for k, v in after_cfg.items() if k != "transformers_version"} == {
        k: v for k, v in before_cfg.items() if k != "transformers_version"
    }


def test_loaded_model_has_tied_decoder_and_same_logits(random_model, hf_twin, padded_batch, tmp_path):
    hf_twin(random_model).save_pretrained(tmp_path / "hf")
    model = load_hf_directory(tmp_path / "hf")
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    b = padded_batch
    with torch.no_grad():
        loaded_logits = model(b.input_ids, b.attention_mask).logits
        assert torch.equal(loaded_logits, random_model(b.input_ids, b.attention_mask).logits)


def test_legacy_pytorch_bin_with_tied_aliases_and_position_ids_loads(random_model, tmp_path):
    """Like the public Geneformer checkpoints: pytorch_model.bin, decoder aliases and the old position_ids buffer."""
    directory = tmp_path / "legacy"
    directory.mkdir()
    cfg = random_model.config
    legacy_config = {  # the fields of Geneformer's gf-6L-30M-i2048 config.json, with the tiny shape
        "architectures": ["BertForMaskedLM"],
        "attention_probs_dropout_prob": 0.02,
        "gradient_checkpointing": False,
        "hidden_act": "relu",
        "hidden_dropout_prob": 0.02,
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "bert",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "transformers_version": "4.6.0",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
    (directory / "config.json").write_text(json.dumps(legacy_config))
    state = {k: v.clone() for k, v in random_model.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(random_model.config.max_position_embeddings)[None]
    torch.save(state, directory / "pytorch_model.bin")
    model = load_hf_directory(directory)
    assert model.config.hidden_dropout_prob == 0.02
    for key, tensor in random_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_load_lists_missing_unexpected_and_misshapen_keys(random_model, tmp_path):
    save_hf_directory(random_model, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    del weights["bert.encoder.layer.1.output.dense.bias"]
    weights["bert.encoder.layer.9.output.dense.bias"] = torch.zeros(3)
    weights["cls.predictions.bias"] = torch.zeros(7)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys") as err:
        load_hf_directory(tmp_path / "m")
    message = str(err.value)
    assert "bert.encoder.layer.1.output.dense.bias" in message
    assert "unexpected keys: bert.encoder.layer.9.output.dense.bias" in message
    assert "cls.predictions.bias: (7,) != expected (40,)" in message


def test_load_rejects_an_untied_decoder(random_model, tmp_path):
    directory = tmp_path / "untied"
    save_hf_directory(random_model, directory)
    weights = load_file(directory / "model.safetensors")
    weights["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"] + 1
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not tied"):
        load_hf_directory(directory)


def test_load_without_weights_names_what_it_found(random_model, tmp_path):
    save_hf_directory(random_model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"found \['config.json'\]"):
        load_hf_directory(tmp_path / "m")


def test_export_copies_every_regular_file_of_vocab_dir(random_model, tmp_path):
    vocab = tmp_path / "vocab"
    (vocab / "subdir").mkdir(parents=True)
    files = {
        "token_dictionary.json": '{"<pad>": 0}',
        "vocab.txt": "<pad>\n",
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
    }
    for name, text in files.items():
        (vocab / name).write_text(text)
    out = save_hf_directory(random_model, tmp_path / "export", vocab_dir=vocab)
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "config.json", "model.safetensors"])
    assert all((out / name).read_text() == text for name, text in files.items())


def test_export_replaces_an_earlier_export_and_leaves_no_temporary_dirs(random_model, tmp_path):
    out = tmp_path / "export"
    save_hf_directory(random_model, out)
    first = (out / "model.safetensors").stat().st_ino
    save_hf_directory(random_model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_never_replaces_a_directory_holding_other_files(random_model, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files this command does not write \(notes.txt\)"):
        save_hf_directory(random_model, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_interrupted_export_leaves_no_directory(random_model, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_hf_directory(random_model, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_export_strips_wrapper_prefixes_and_extra_state():
    state = {
        "_orig_mod.bert.embeddings.LayerNorm.weight": torch.ones(2),
        "module.bert.embeddings.LayerNorm.bias": torch.zeros(2),
        "bert.encoder.layer.0.attention.self.core._extra_state": torch.zeros(1),
        "cls.predictions.decoder.weight": torch.ones(2, 2),
    }
    expected = ["bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"]
    assert list(hf_io.to_hf_state_dict(state)) == expected


def test_load_keeps_checkpoint_dtype_when_asked(random_model, tmp_path):
    hf_model = transformers.BertForMaskedLM(random_model.config.to_hf_config())
    hf_model.load_state_dict(random_model.state_dict())
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    kept = load_hf_directory(tmp_path / "bf16", dtype=None)
    assert kept.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    model = load_hf_directory(tmp_path / "bf16")
    assert isinstance(model, GeneformerForMaskedLM)
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
