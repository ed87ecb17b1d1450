"""Config composition and validation: every tier composes, mistakes name the key and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from geneformer_workflow.train import compose_config, main, validate_config

from .conftest import compose

TIERS = ["sanity", "10m", "10m_te", "106m", "4b", "4b_te", "4b_te_fp8"]
REQUIRED = ["run_dir=/tmp/x", "data.corpus=[a.parquet]", "data.vocab_dir=v", "data.max_length=2048"]


@pytest.mark.parametrize("name", TIERS)
def test_every_tier_composes_and_validates(name):
    cfg = compose_config(name, REQUIRED)
    validate_config(cfg)
    assert cfg.model.max_position_embeddings >= cfg.data.max_length


def test_tier_shapes_match_the_model_presets():
    from geneformer_workflow.model import MODEL_PRESETS

    for tier, preset in [("sanity", "sanity"), ("10m", "10m"), ("106m", "106m"), ("4b", "4b")]:
        cfg = compose_config(tier, REQUIRED)
        assert {k: cfg.model[k] for k in MODEL_PRESETS[preset]} == MODEL_PRESETS[preset]


def test_missing_mandatory_keys_are_listed():
    with pytest.raises(ValueError, match=re.escape("['run_dir', 'data.vocab_dir']")):
        validate_config(compose_config("sanity", []))
    with pytest.raises(ValueError, match=re.escape("set exactly one of data.store and data.corpus (neither is set)")):
        validate_config(compose_config("sanity", ["run_dir=/tmp/x", "data.vocab_dir=v"]))


@pytest.mark.parametrize("tier", ["sanity", "106m"])
@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_null_max_length_is_the_vocabularys_model_max_length(tmp_path, tier, preset):
    from geneformer_workflow.presets import get_preset
    from geneformer_workflow.tokenize.vocab import write_vocab_dir

    tokens = {"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2}
    if preset == "v2":
        tokens |= {"<cls>": 3, "<eos>": 4}
    write_vocab_dir(tokens, tmp_path / "vocab", max_length=get_preset(preset).max_length)
    cfg = compose_config(tier, ["run_dir=/tmp/x", "data.corpus=[a.parquet]", f"data.vocab_dir={tmp_path / 'vocab'}"])
    validate_config(cfg)
    assert cfg.data.max_length == cfg.model.max_position_embeddings == get_preset(preset).max_length
    explicit = compose_config(tier, [*REQUIRED[:2], f"data.vocab_dir={tmp_path / 'vocab'}", "data.max_length=512"])
    assert explicit.data.max_length == explicit.model.max_position_embeddings == 512


def test_null_max_length_without_a_vocabulary_length_names_the_fix(tmp_path):
    (tmp_path / "token_dictionary.json").write_text('{"<pad>": 0, "<mask>": 1, "G": 2}')
    cfg = compose_config("sanity", ["run_dir=/tmp/x", "data.corpus=[a.parquet]", f"data.vocab_dir={tmp_path}"])
    expected = (
        f"data.max_length is null (= the vocabulary's model_max_length) but {tmp_path / 'tokenizer_config.json'}"
    )
    with pytest.raises(ValueError, match=re.escape(expected) + ".*set data.max_length"):
        validate_config(cfg)


def test_position_table_shorter_than_max_length_names_both_keys():
    cfg = compose_config("sanity", [*REQUIRED, "data.max_length=4096", "model.max_position_embeddings=2048"])
    with pytest.raises(ValueError, match=r"model\.max_position_embeddings=2048 .* data\.max_length=4096"):
        validate_config(cfg)


def test_fp8_without_te_names_the_fix():
    with pytest.raises(ValueError, match=re.escape("model.use_te=true")):
        validate_config(compose_config("sanity", [*REQUIRED, "fp8.enabled=true"]))


@pytest.mark.parametrize("value", ["0", "-1", "fast"], ids=["zero", "negative", "text"])
def test_peak_tflops_must_be_positive_or_null(value):
    with pytest.raises(ValueError, match=r"logging\.peak_tflops"):
        validate_config(compose_config("sanity", [*REQUIRED, f"logging.peak_tflops={value}"]))


def test_unknown_config_name_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="sanity"):
        compose_config("nope", [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.use_te=true"], "needs CUDA + Transformer Engine"),
        (["training.precision=bf16"], "training.precision=bf16 needs a CUDA device"),
        (["backend.name=mfsdp"], "backend.name=mfsdp needs CUDA"),
        (["training.device=cuda"], "no CUDA device"),
    ],
    ids=["te", "bf16", "mfsdp", "cuda"],
)
def test_gpu_only_features_fail_clearly_on_cpu(small_corpus, tmp_path: Path, overrides, message):
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        main(compose(small_corpus, tmp_path, *overrides))
