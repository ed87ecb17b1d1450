"""Transformer Engine vs plain PyTorch on a GPU: the same random weights, compared layer by layer.

Runs only where CUDA and ``transformer_engine.pytorch`` both import (skipped otherwise, e.g. on CPU machines).
Errors are relative L2 norms ``||a - b|| / ||b||`` over the real (non-pad) tokens, so a wiring mistake (mask
polarity, pre-LN, GELU) shows as an O(1) error while kernel rounding stays far below the tolerances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from geneformer_workflow.model import (
    GeneformerForMaskedLM,
    ModelConfig,
    fp8_autocast_context,
    hf_state_dict_to_te,
    resolve_fp8_recipe,
    te_primitives,
    te_state_dict_to_hf,
    to_hf_state_dict,
    unpad,
)


def _te_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # the CPU meta package raises RuntimeError
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _te_ready(), reason="requires_gpu: needs CUDA and transformer_engine.pytorch"),
]
CUDA = torch.device("cuda")


@dataclass(frozen=True)
class TETolerances:
    """Relative L2 error allowed between the TE and the torch model.

    Calibrated on the torch model alone (CPU, these weights): bf16 vs fp32 differs by <= 0.9 % in hidden states
    and logits and <= 7 % in gradients; TE may also run fp32 GEMMs as TF32 (10-bit mantissa). A wiring mistake
    (mask polarity, pre-LN, GELU) gives errors of order 1.
    """

    fp32: float = 5e-3
    bf16: float = 3e-2
    grad_fp32: float = 2e-2
    grad_bf16: float = 0.15
    fp8_loss: float = 5e-2  # |loss_fp8 - loss_bf16| / loss_bf16


TOL = TETolerances()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


@pytest.fixture
def cfg() -> ModelConfig:
    """Every dimension a multiple of 16 (FP8 GEMMs), 4 heads of 16, dropout off (deterministic)."""
    return ModelConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture
def batch(cfg):
    """Four right-padded cells of 32, 19, 7 and 1 tokens (T = 32), about 30 % masked, at least one per cell."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([32, 19, 7, 1])
    mask = (torch.arange(32)[None, :] < lengths[:, None]).long()
    ids = torch.randint(2, cfg.vocab_size, mask.shape, generator=gen).masked_fill(mask == 0, 0)
    chosen = ((torch.rand(mask.shape, generator=gen) < 0.3) | (torch.arange(32) == 0)) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.ones_like(ids), ids)
    return ids.to(CUDA), mask.to(CUDA), labels.to(CUDA)


def _randomize(model: torch.nn.Module) -> None:
    """Unit-scale random weights (std 1/sqrt(fan_in)), LayerNorm gains near 1, small biases: attention is neither
    uniform (a wrong mask would hide) nor saturated (rounding would dominate)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 2:
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _pair(cfg: ModelConfig, dtype: torch.dtype) -> tuple[GeneformerForMaskedLM, GeneformerForMaskedLM]:
    """(torch model, TE model) with the same random weights, on CUDA in ``dtype``, eval mode."""
    torch_model = GeneformerForMaskedLM(cfg)
    _randomize(torch_model)
    te_model = GeneformerForMaskedLM(cfg, te_primitives()).to(CUDA)
    extra = [key for key in te_model.state_dict() if key.endswith("._extra_state")]
    te_model.load_state_dict(hf_state_dict_to_te(torch_model.state_dict(), extra_state_keys=extra), strict=True)
    return torch_model.to(CUDA, dtype).eval(), te_model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_batch_matches_torch_layer_by_layer(cfg, batch, dtype):
    ids, mask, labels = batch
    torch_model, te_model = _pair(cfg, dtype)
    tol = TOL.fp32 if dtype == torch.float32 else TOL.bf16
    real = mask.bool()
    with torch.no_grad():
        _, want = torch_model.encode(ids, mask, output_hidden_states=True)
        _, got = te_model.encode(ids, mask, output_hidden_states=True)
        want_out = torch_model(ids, mask, labels=labels)
        got_out = te_model(ids, mask, labels=labels)
    assert len(got) == cfg.num_hidden_layers + 1
    for i, (g, w) in enumerate(zip(got, want, strict=True)):  # embeddings, then each layer's output
        assert rel_err(g[real], w[real]) < tol, f"hidden state {i}"
    assert rel_err(got_out.logits, want_out.logits) < tol
    assert abs(got_out.loss.item() - want_out.loss.item()) < tol * want_out.loss.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_batch_matches_padded_torch_layer_by_layer(cfg, batch, dtype):
    ids, mask, labels = batch
    torch_model, te_model = _pair(cfg, dtype)
    tol = TOL.fp32 if dtype == torch.float32 else TOL.bf16
    ids_1T, labels_1T, packed = unpad(ids, mask, labels)
    real = mask.bool()
    with torch.no_grad():
        _, want = torch_model.encode(ids, mask, output_hidden_states=True)
        want_out = torch_model(ids, mask, labels=labels)
        try:
            _, got = te_model.encode(ids_1T, packed=packed, output_hidden_states=True)
        except Exception as err:  # older TE: no "thd" attention backend in fp32
            if dtype == torch.float32 and "dot product attention" in str(err).lower():
                pytest.skip(f"this TE has no fp32 'thd' attention backend: {err}")
            raise
        got_out = te_model(ids_1T, labels=labels_1T, packed=packed)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g[0], w[real]) < tol, f"hidden state {i}"
    assert rel_err(got_out.logits, want_out.logits) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradients_match_torch(cfg, batch, dtype):
    ids, mask, labels = batch
    torch_model, te_model = _pair(cfg, dtype)
    for model in (torch_model, te_model):
        model.train()  # dropout is 0: training mode stays deterministic
        model(ids, mask, labels=labels).loss.backward()
    tol = TOL.grad_fp32 if dtype == torch.float32 else TOL.grad_bf16
    te_params = dict(te_model.named_parameters())
    for name, p in torch_model.named_parameters():
        if name.endswith("attention.self.key.bias"):
            continue  # mathematically zero (softmax ignores a per-query constant): only rounding noise to compare
        assert rel_err(te_params[name].grad, p.grad) < tol, name


def test_torch_autocast_bf16_over_fp32_weights_matches_torch(cfg, batch):
    """How the trainer runs DDP / megatron-fsdp: fp32 master weights under ``torch.autocast(bf16)``."""
    ids, mask, labels = batch
    torch_model, te_model = _pair(cfg, torch.float32)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = torch_model(ids, mask, labels=labels)
        got = te_model(ids, mask, labels=labels)
    assert rel_err(got.logits, want.logits) < TOL.bf16


def test_pad_tokens_change_nothing_at_real_positions(cfg, batch):
    ids, mask, _ = batch
    _, te_model = _pair(cfg, torch.bfloat16)
    real = mask.bool()
    with torch.no_grad():
        clean = te_model.encode(ids, mask)[real]
        noisy = te_model.encode(ids.masked_fill(~real, 5), mask)[real]
    torch.testing.assert_close(noisy, clean, atol=0, rtol=0)


def test_real_te_state_dict_converts_to_hf_names(cfg):
    torch_model, te_model = _pair(cfg, torch.float32)
    te_state = te_model.state_dict()
    assert any(key.endswith("._extra_state") for key in te_state)
    hf_state = te_state_dict_to_hf(te_state)
    assert list(hf_state) == list(torch_model.state_dict())
    assert all(torch.equal(hf_state[k], v) for k, v in torch_model.state_dict().items())


def _fp8_capability() -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else (0, 0)


@pytest.mark.skipif(_fp8_capability() < (8, 9), reason="requires_fp8: compute capability >= 8.9")
@pytest.mark.parametrize("recipe_name", ["delayed", "current", "mxfp8"])
def test_fp8_loss_is_finite_and_close_to_bf16(cfg, batch, recipe_name):
    if recipe_name == "mxfp8" and _fp8_capability() < (10, 0):
        pytest.skip("requires_fp8: MXFP8 needs compute capability >= 10.0")
    ids, mask, labels = batch
    _, te_model = _pair(cfg, torch.float32)
    te_model.train()
    recipe = resolve_fp8_recipe(recipe_name, CUDA)
    ids_1T, labels_1T, packed = unpad(ids, mask, labels)  # T_total = 59 rows: the linear pads them for FP8
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = te_model(ids, mask, labels=labels).loss.item()
    for step in range(3):  # delayed scaling uses the amax history of earlier steps
        for inputs in ((ids, mask, labels), (ids_1T, None, labels_1T)):
            te_model.zero_grad(set_to_none=True)
            kwargs = {"packed": packed} if inputs[1] is None else {}
            with torch.autocast("cuda", dtype=torch.bfloat16), fp8_autocast_context(True, recipe, CUDA):
                out = te_model(inputs[0], inputs[1], labels=inputs[2], **kwargs)
            out.loss.backward()
            assert math.isfinite(out.loss.item()), (step, kwargs.keys())
            assert all(torch.isfinite(p.grad).all() for p in te_model.parameters() if p.grad is not None)
            assert abs(out.loss.item() - reference) < TOL.fp8_loss * reference, (step, out.loss.item(), reference)
    exported = to_hf_state_dict(te_model.state_dict())  # with FP8 metadata in every _extra_state now
    assert set(exported) == set(to_hf_state_dict(GeneformerForMaskedLM(cfg).state_dict()))


def test_te_modules_built_under_the_meta_device_stay_on_it(cfg):
    """te.Linear defers initialisation only for the string "meta" (issue 14): nothing may land on the GPU."""
    before = torch.cuda.memory_allocated()
    with torch.device("meta"):
        model = GeneformerForMaskedLM(cfg, te_primitives())
    assert all(p.is_meta for p in model.parameters())
    assert torch.cuda.memory_allocated() == before


@pytest.mark.skipif(_fp8_capability() < (8, 9), reason="requires_fp8: compute capability >= 8.9")
def test_fp8_delayed_scaling_state_survives_a_checkpoint_exactly(cfg, batch, tmp_path):
    """Train under delayed scaling, checkpoint, continue; a fresh model resumed from the checkpoint matches."""
    from geneformer_workflow.train.checkpoint import AppState, TrainState, load_checkpoint, save_checkpoint
    from geneformer_workflow.train.distributed import DistributedConfig, Runtime
    from geneformer_workflow.train.fp8_state import Fp8ScalingState, delayed_scaling_tensors

    recipe = resolve_fp8_recipe("delayed", CUDA, recipe_kwargs={"amax_history_len": 8})
    runtime = Runtime(dist=DistributedConfig(), device=CUDA)
    torch.use_deterministic_algorithms(True, warn_only=True)

    def build(seed: int) -> tuple[torch.nn.Module, AppState]:
        torch.manual_seed(seed)
        model = GeneformerForMaskedLM(cfg, te_primitives()).to(CUDA).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        app = AppState(model, optimizer, scheduler, TrainState(), backend="none", fp8=Fp8ScalingState(model, recipe))
        return model, app

    def train(app: AppState, steps: range) -> None:
        for step in steps:
            order = torch.arange(4, device=CUDA).roll(step)  # batches differ, so the amax history moves
            ids, mask, labels = (tensor[order] for tensor in batch)
            app.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16), fp8_autocast_context(True, recipe, CUDA):
                loss = app.model(ids, mask, labels=labels).loss
            loss.backward()
            app.optimizer.step()
            app.state.step = step + 1

    model, app = build(0)
    train(app, range(3))
    saved = {k: v.clone() for k, v in delayed_scaling_tensors(model).items()}
    assert saved and any(not torch.all(v == 1) for k, v in saved.items() if k.endswith(".scale"))
    path = save_checkpoint(tmp_path, app, runtime, meta={}, model_config={}, keep_last=0)
    train(app, range(3, 6))
    fresh, resumed = build(1)
    load_checkpoint(path, resumed)
    restored = delayed_scaling_tensors(fresh)
    for key, value in saved.items():
        if key in restored:
            assert torch.equal(restored[key].cpu(), value.cpu()), key
    train(resumed, range(3, 6))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        if not name.endswith("_extra_state"):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
