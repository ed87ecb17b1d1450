"""Transformer Engine on CPU: TE <-> HF weight names, the import guard, and the TE plumbing against a stand-in.

TE cannot run here, so ``fake_te`` (this directory) stands in for ``transformer_engine.pytorch`` 2.20, following its
source on what our code relies on (the meta-device test, uint8 extra state, the attention mask and ``cu_seqlens``
contracts); each point cites TE there. The real kernels are compared in ``test_te_gpu.py``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from geneformer_workflow.model import (
    GeneformerForMaskedLM,
    ModelConfig,
    PackedSequences,
    fp8_autocast_context,
    hf_state_dict_to_te,
    require_te,
    resolve_fp8_recipe,
    save_hf_state_dict,
    te_names,
    te_primitives,
    te_state_dict_to_hf,
    to_hf_state_dict,
    unpad,
)
from geneformer_workflow.model import fp8 as fp8_mod
from geneformer_workflow.model import te as te_mod
from omegaconf import OmegaConf
from torch import nn

from . import fake_te as fake
from .fake_te import fake_te

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config" / "train"


@pytest.fixture
def te_model(tiny_cfg: ModelConfig) -> GeneformerForMaskedLM:
    """The tiny model built from ``te_primitives`` on the stand-in, in eval mode."""
    return GeneformerForMaskedLM(tiny_cfg, te_primitives(te_module=fake_te())).eval()


def _hf_model(cfg: ModelConfig, randomize) -> transformers.BertForMaskedLM:
    hf = transformers.BertForMaskedLM(cfg.to_hf_config())
    randomize(hf)
    return hf


def _extra_keys(model: nn.Module) -> list[str]:
    return [key for key in model.state_dict() if key.endswith("._extra_state")]


# ----------------------------------------------------------------------------------------------- names
def test_key_map_covers_exactly_the_transformers_keys(tiny_cfg):
    expanded = {
        pattern.replace("*", str(i))
        for pattern in te_names.HF_TO_TE_KEYS
        for i in range(tiny_cfg.num_hidden_layers if "*" in pattern else 1)
    }
    assert expanded == set(transformers.BertForMaskedLM(tiny_cfg.to_hf_config()).state_dict())
    assert expanded == set(GeneformerForMaskedLM(tiny_cfg).state_dict())


def test_te_model_writes_extra_state_only_where_the_map_expects_it(te_model, tiny_cfg):
    extra = _extra_keys(te_model)
    # embeddings LayerNorm + head dense and LayerNorm, then per layer 8 te.Linear / te.LayerNorm + the attention
    modules = {te_names._pattern(key.removesuffix("._extra_state"))[0] for key in extra}
    assert modules == set(te_names.TE_EXTRA_STATE_MODULES) | {"bert.encoder.layer.*.attention.self.core.dpa"}
    assert len(extra) == 3 + tiny_cfg.num_hidden_layers * 9
    # TE 2.x: a uint8 tensor, empty until an FP8 forward ran (module/base.py get_extra_state)
    assert all(te_model.state_dict()[key].dtype == torch.uint8 for key in extra)
    assert all(te_model.state_dict()[key].numel() == 0 for key in extra)


def test_extra_state_after_delayed_scaling_is_a_pickle_that_a_fresh_model_refuses(te_model, tiny_cfg, padded_batch):
    """Why training checkpoints leave `_extra_state` out: its size changes, and TE 2.20 refuses the pickle."""
    b = padded_batch
    with fake.autocast(recipe=fake.DelayedScaling(amax_history_len=4)):
        te_model(b.input_ids, b.attention_mask, labels=b.labels)
    trained = te_model.state_dict()
    query = "bert.encoder.layer.0.attention.self.query._extra_state"
    assert trained[query].dtype == torch.uint8 and trained[query].numel() > 0
    fresh = GeneformerForMaskedLM(tiny_cfg, te_primitives(te_module=fake_te()))
    assert fresh.state_dict()[query].numel() == 0  # a DCP load planner sees a size mismatch
    with pytest.raises(RuntimeError, match="Refusing to load pickled Transformer Engine extra state"):
        fresh.load_state_dict(trained)


def test_te_modules_built_under_the_meta_device_are_not_materialised(tiny_cfg):
    """TE defers initialisation only for device == "meta" (a string); a torch.device makes every rank initialise."""
    with torch.device("meta"):
        model = GeneformerForMaskedLM(tiny_cfg, te_primitives(te_module=fake_te()))
    linears = [m for m in model.modules() if isinstance(m, fake.Linear)]
    assert linears and not any(m.materialized for m in linears)
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(AssertionError):  # the stand-in does catch a torch.device (the bug of issue 14)
        assert not fake.Linear(4, 4, device=torch.device("meta")).materialized


def test_te_state_dict_converts_to_the_keys_transformers_loads_strictly(te_model, tiny_cfg):
    hf_state = te_state_dict_to_hf(te_model.state_dict())
    hf = transformers.BertForMaskedLM(tiny_cfg.to_hf_config())
    assert set(hf_state) == set(hf.state_dict())
    hf.load_state_dict(hf_state, strict=True)
    for key, value in hf.state_dict().items():
        assert torch.equal(value, te_model.state_dict()[key]), key


def test_hf_to_te_to_hf_round_trip_is_bit_identical(te_model, tiny_cfg, randomize):
    hf_state = _hf_model(tiny_cfg, randomize).state_dict()
    te_state = hf_state_dict_to_te(hf_state, extra_state_keys=_extra_keys(te_model))
    te_model.load_state_dict(te_state, strict=True)
    back = te_state_dict_to_hf(te_model.state_dict())
    assert list(back) == list(hf_state)
    for key, value in hf_state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_hf_file_without_tied_aliases_loads_into_te_model_and_exports_identically(te_model, tiny_cfg, randomize):
    file_tensors = to_hf_state_dict(_hf_model(tiny_cfg, randomize).state_dict())  # as in model.safetensors
    assert "cls.predictions.decoder.weight" not in file_tensors
    te_model.load_state_dict(hf_state_dict_to_te(file_tensors, extra_state_keys=_extra_keys(te_model)), strict=True)
    assert te_model.cls.predictions.decoder.weight is te_model.bert.embeddings.word_embeddings.weight
    exported = to_hf_state_dict(te_model.state_dict())
    assert list(exported) == list(file_tensors)
    assert all(torch.equal(exported[k], file_tensors[k]) for k in exported)


def test_wrapped_te_checkpoint_exports_a_directory_transformers_loads(
    te_model, random_model, padded_batch, tol, tmp_path
):
    te_model.load_state_dict(
        hf_state_dict_to_te(random_model.state_dict(), extra_state_keys=_extra_keys(te_model)), strict=True
    )
    wrapped = {f"module.{key}": value for key, value in te_model.state_dict().items()}  # DDP / megatron-fsdp
    out = save_hf_state_dict(wrapped, te_model.config, tmp_path / "export")
    hf, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    b = padded_batch
    with torch.no_grad():
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        ours = random_model(b.input_ids, b.attention_mask).logits
    real = b.attention_mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=tol.logits_atol, rtol=tol.logits_rtol)


@pytest.mark.parametrize(
    "key",
    [
        "bert.encoder.layer.0.attention.self.qkv.weight",  # a fused-QKV name this map does not have
        "bert.embeddings.word_embeddings._extra_state",  # nn.Embedding: no TE module there
        "bert.encoder.layer.0.attention.self._extra_state",
        "bert.pooler.dense.weight",
    ],
)
def test_unknown_keys_are_refused_by_name(te_model, key):
    state = {**te_model.state_dict(), key: torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 state-dict keys .*" + key.replace(".", r"\.")):
        te_state_dict_to_hf(state)
    with pytest.raises(ValueError, match="neither Hugging Face BertForMaskedLM keys"):
        to_hf_state_dict(state)


def test_hf_to_te_refuses_unknown_weights_and_extra_state_of_no_te_module(te_model):
    weights = te_state_dict_to_hf(te_model.state_dict())
    with pytest.raises(ValueError, match=r"1 keys are not BertForMaskedLM keys: cls\.seq_relationship\.weight"):
        hf_state_dict_to_te({**weights, "cls.seq_relationship.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"belong to no TE module of this model: cls\.predictions\.decoder\._extra"):
        hf_state_dict_to_te(weights, extra_state_keys=["cls.predictions.decoder._extra_state"])


# ----------------------------------------------------------------------------------------------- import guard
def _forget_te(monkeypatch) -> None:
    for name in [n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine.")]:
        monkeypatch.delitem(sys.modules, name)


def test_missing_te_gives_an_error_that_names_the_setting(monkeypatch):
    _forget_te(monkeypatch)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ModuleNotFoundError
    with pytest.raises(RuntimeError, match=r"model\.use_te=true needs CUDA \+ Transformer Engine.*set model\.use_te"):
        te_primitives()
    with pytest.raises(RuntimeError, match=r"fp8\.enabled=true .*importing transformer_engine\.pytorch failed"):
        fp8_autocast_context(True, "delayed", torch.device("cuda", 0))


def test_te_meta_package_runtime_error_gives_the_same_clear_error(monkeypatch, tmp_path):
    _forget_te(monkeypatch)
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("meta package: no framework installed")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"model\.use_te=true .*RuntimeError\('meta package") as err:
        te_primitives()
    assert isinstance(err.value.__cause__, RuntimeError)


def test_te_without_cuda_says_so(monkeypatch):
    _forget_te(monkeypatch)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", fake_te())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError, match=r"model\.use_te=true needs CUDA .* no CUDA device\. Set model\.use_te=false"
    ):
        require_te()


# ----------------------------------------------------------------------------------------------- plumbing
def test_te_primitives_compute_the_torch_function_padded_and_packed(te_model, random_model, padded_batch, tol):
    b = padded_batch
    te_model.load_state_dict(
        hf_state_dict_to_te(random_model.state_dict(), extra_state_keys=_extra_keys(te_model)), strict=True
    )
    real = b.attention_mask.bool()
    with torch.no_grad():
        want = random_model(b.input_ids, b.attention_mask, labels=b.labels)
        got = te_model(b.input_ids, b.attention_mask, labels=b.labels)
        ids_1T, labels_1T, packed = unpad(b.input_ids, b.attention_mask, b.labels)
        got_packed = te_model(ids_1T, labels=labels_1T, packed=packed)
        noisy = b.input_ids.masked_fill(~real, 7)  # pad tokens must change nothing at real positions
        hidden = te_model.encode(b.input_ids, b.attention_mask)[real]
        hidden_noisy = te_model.encode(noisy, b.attention_mask)[real]
    for out in (got, got_packed):
        torch.testing.assert_close(out.logits, want.logits, atol=tol.logits_atol, rtol=tol.logits_rtol)
        torch.testing.assert_close(out.loss, want.loss, atol=tol.loss_atol, rtol=0)
    torch.testing.assert_close(hidden_noisy, hidden, atol=tol.logits_atol, rtol=0)
    assert te_model.bert.encoder.layer[0].attention.self.core.dpa.formats_seen == ["bshd", "thd", "bshd", "bshd"]


def test_linear_pads_rows_to_the_fp8_multiple_and_handles_zero_rows(te_model, random_model, padded_batch):
    # No TE here, so the FP8 state is unknown and the linear pads whenever rows % 32 != 0 (harmless when not FP8).
    b = padded_batch
    te_model.load_state_dict(
        hf_state_dict_to_te(random_model.state_dict(), extra_state_keys=_extra_keys(te_model)), strict=True
    )
    head = te_model.cls.predictions.transform.dense
    with torch.no_grad():
        out = te_model(b.input_ids, b.attention_mask, labels=b.labels)  # M masked rows, not a multiple of 32
        none = te_model(b.input_ids, b.attention_mask, labels=torch.full_like(b.labels, -100))
    assert out.num_masked % 32 != 0 and head.rows_seen[0] == out.num_masked + (-out.num_masked % 32)
    assert none.logits.shape == (0, te_model.config.vocab_size) and none.loss.item() == 0.0
    assert head.rows_seen[-1] == 32


def test_packed_sequences_on_another_device_are_refused(te_model):
    core = te_model.bert.encoder.layer[0].attention.self.core
    q_1TND = torch.zeros(1, 5, 4, 8)
    elsewhere = PackedSequences((2, 3), torch.tensor([0, 2, 5], dtype=torch.int32, device="meta"), 3)
    with pytest.raises(ValueError, match=r"cu_seqlens is on meta but the tokens are on cpu; move it with packed\.to"):
        core(q_1TND, q_1TND, q_1TND, elsewhere)


def test_te_modules_follow_the_meta_device_context():
    with torch.device("meta"):
        assert te_mod._te_device() == "meta"  # a str: TE compares device == "meta"
    assert te_mod._te_device() == "cuda"
    prepared = te_mod.TEAttention.prepare_mask(torch.tensor([[1, 1, 0]]))
    assert prepared.tolist() == [[[[False, False, True]]]]  # True = masked out, TE's convention


# ----------------------------------------------------------------------------------------------- FP8 helper
class _Recipe:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


def _fake_fp8(monkeypatch, capability: tuple[int, int], *, with_autocast: bool = True) -> list[tuple]:
    """Install a stand-in TE with recipes and autocast on a fake GPU; returns the recorded autocast calls."""
    _forget_te(monkeypatch)
    calls: list[tuple] = []
    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    recipe_mod.Recipe = _Recipe
    recipe_mod.Format = types.SimpleNamespace(HYBRID="hybrid", E4M3="e4m3")
    for name in ("DelayedScaling", "Float8CurrentScaling", "MXFP8BlockScaling"):
        setattr(recipe_mod, name, type(name, (_Recipe,), {}))
    te = fake_te()
    if with_autocast:
        te.autocast = lambda **kw: calls.append(("autocast", kw)) or contextlib.nullcontext()
    else:
        del te.autocast  # TE before 2.x: only fp8_autocast
    te.fp8_autocast = lambda **kw: calls.append(("fp8_autocast", kw)) or contextlib.nullcontext()
    root, common = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.common")
    root.pytorch, root.common, common.recipe = te, common, recipe_mod
    for name, module in [("", root), (".pytorch", te), (".common", common), (".common.recipe", recipe_mod)]:
        monkeypatch.setitem(sys.modules, "transformer_engine" + name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    monkeypatch.setattr(fp8_mod, "_warned", set())
    return calls


CUDA = torch.device("cuda", 0)


def test_fp8_config_of_4b_te_fp8_builds_delayed_scaling_under_te_autocast(monkeypatch):
    calls = _fake_fp8(monkeypatch, (9, 0))
    fp8 = OmegaConf.merge(
        OmegaConf.load(CONFIG_DIR / "defaults.yaml").fp8, OmegaConf.load(CONFIG_DIR / "4b_te_fp8.yaml").fp8
    )
    kwargs = OmegaConf.to_container(fp8.recipe_kwargs)
    recipe = resolve_fp8_recipe(fp8.recipe, CUDA, fp8_format=fp8.format, recipe_kwargs=kwargs)
    assert type(recipe).__name__ == "DelayedScaling"
    assert recipe.kwargs == {"fp8_format": "hybrid", "amax_history_len": 1024, "amax_compute_algo": "max"}
    with fp8_autocast_context(fp8.enabled, recipe, CUDA, amax_reduction_group="dp"):
        pass
    assert calls == [("autocast", {"enabled": True, "recipe": recipe, "amax_reduction_group": "dp"})]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("delayed", "DelayedScaling"),
        ("current", "Float8CurrentScaling"),
        ("Float8CurrentScaling", "Float8CurrentScaling"),
    ],
)
def test_recipe_short_and_class_names(monkeypatch, name, cls):
    _fake_fp8(monkeypatch, (9, 0))
    assert type(resolve_fp8_recipe(name, CUDA, fp8_format="E4M3")).__name__ == cls


def test_mxfp8_needs_blackwell(monkeypatch):
    _fake_fp8(monkeypatch, (9, 0))
    with pytest.raises(ValueError, match=r"compute capability >= 10\.0 \(Blackwell\); this GPU has 9\.0"):
        resolve_fp8_recipe("mxfp8", CUDA)
    _fake_fp8(monkeypatch, (10, 0))
    assert type(resolve_fp8_recipe("mxfp8", CUDA)).__name__ == "MXFP8BlockScaling"


def test_gpu_without_fp8_falls_back_to_bf16_with_one_warning(monkeypatch, caplog):
    calls = _fake_fp8(monkeypatch, (8, 0))
    with caplog.at_level(logging.WARNING, logger=fp8_mod.__name__):
        for _ in range(3):
            assert isinstance(fp8_autocast_context(True, "delayed", CUDA), contextlib.nullcontext)
    assert len(caplog.records) == 1
    assert "compute capability 8.0 < 8.9" in caplog.text and "bf16 without FP8" in caplog.text
    assert calls == []


def test_fp8_disabled_or_older_te(monkeypatch):
    calls = _fake_fp8(monkeypatch, (9, 0), with_autocast=False)
    assert isinstance(fp8_autocast_context(False, "delayed", CUDA), contextlib.nullcontext)
    fp8_autocast_context(True, "delayed", CUDA)
    assert calls[0][0] == "fp8_autocast" and type(calls[0][1]["fp8_recipe"]).__name__ == "DelayedScaling"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recipe_name": "fastest"}, r"fp8\.recipe='fastest' names no TE recipe class"),
        ({"recipe_name": "transformer_engine.common.recipe.Format"}, "not a subclass"),
        ({"recipe_name": "delayed", "fp8_format": "E5M3"}, r"fp8\.format='E5M3'"),
        ({"recipe_name": "delayed", "device": torch.device("cpu")}, r"needs a CUDA device, got cpu"),
    ],
)
def test_bad_fp8_settings_are_refused_by_name(monkeypatch, kwargs, match):
    _fake_fp8(monkeypatch, (9, 0))
    kwargs = {"device": CUDA, **kwargs}
    with pytest.raises(ValueError, match=match):
        resolve_fp8_recipe(kwargs.pop("recipe_name"), kwargs.pop("device"), **kwargs)
