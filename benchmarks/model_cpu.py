"""CPU step time of our Geneformer BERT vs ``transformers.BertForMaskedLM`` (sdpa), on the same batches.

One step = forward + backward + AdamW update, masked-LM loss over 15 % of the real tokens. Both models hold the
same weights and see the same right-padded batches (cell lengths uniform in [T/2, T]); their steps alternate
(ours, theirs, ours, ...), so load from other processes hits both alike. Ours runs twice: on the padded batch
(the MLM head only at masked positions) and packed (``unpad`` inside the timed step, then no compute on padding:
see ``model/packing.py``); each keeps its own AdamW state. Reported: the median step time and the non-pad tokens
per second at that median.

    .venv/bin/python benchmarks/model_cpu.py                      # 10m shape, 8 x 2048, dropout 0
    .venv/bin/python benchmarks/model_cpu.py --dropout 0.02       # Geneformer's dropout (SDPA math fallback)
    .venv/bin/python benchmarks/model_cpu.py --batch-size 4 --seq-len 512 --steps 5   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig, unpad


def make_batches(
    n: int, *, batch_size: int, seq_len: int, vocab_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n`` batches of (input_ids, attention_mask, labels), right-padded, 15 % of real tokens masked."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=gen)
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()  # (B, T)
        ids = torch.randint(2, vocab_size, (batch_size, seq_len), generator=gen) * mask
        chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & mask.bool()
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        ids = torch.where(chosen, torch.ones_like(ids), ids)  # <mask> = 1
        batches.append((ids, mask, labels))
    return batches


def time_interleaved(steps: dict[str, Callable[..., None]], batches, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each named step function, alternating between them on every batch."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            start = time.perf_counter()
            step(*batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="cells per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=2048, help="padded length T in tokens (default 2048)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="hidden and attention dropout (default 0.0; > 0 makes SDPA use its slow math path)",
    )
    parser.add_argument("--vocab-size", type=int, default=25_426, help="vocabulary size (default: Geneformer V1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0 = torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig.from_preset(
        "10m",
        vocab_size=args.vocab_size,
        max_position_embeddings=args.seq_len,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
    )
    torch.manual_seed(0)
    ours = GeneformerForMaskedLM(cfg).train()
    theirs = transformers.BertForMaskedLM._from_config(cfg.to_hf_config(), attn_implementation="sdpa").train()
    theirs.load_state_dict(ours.state_dict())
    batches = make_batches(
        args.warmup + args.steps, batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size, seed=1
    )
    real_tokens = sum(int(m.sum()) for _, m, _ in batches[args.warmup :]) / args.steps

    def make_step(model, call):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(ids, mask, labels):
            opt.zero_grad(set_to_none=True)
            call(model, ids, mask, labels).backward()
            opt.step()

        return step

    def packed_call(model, ids, mask, labels):
        ids_1T, labels_1T, packed = unpad(ids, mask, labels)  # counted in the step time
        return model(ids_1T, labels=labels_1T, packed=packed).loss

    runs = {
        "ours padded": make_step(ours, lambda m, i, a, y: m(i, a, labels=y).loss),
        "ours packed": make_step(ours, packed_call),
        "transformers sdpa": make_step(theirs, lambda m, i, a, y: m(input_ids=i, attention_mask=a, labels=y).loss),
    }
    print(
        f"10m shape, batch {args.batch_size} x {args.seq_len}, dropout {args.dropout}, "
        f"{torch.get_num_threads()} threads, {real_tokens:.0f} non-pad tokens/step"
    )
    print(f"{'model':<26}{'median s/step':>14}{'min s/step':>12}{'non-pad tok/s':>16}")
    results = {}
    for name, times in time_interleaved(runs, batches, args.warmup).items():
        results[name] = statistics.median(times)
        print(f"{name:<26}{results[name]:>14.2f}{min(times):>12.2f}{real_tokens / results[name]:>16.0f}")
    base = results["transformers sdpa"]
    for name in ("ours padded", "ours packed"):
        print(f"speed-up of {name}: {base / results[name]:.2f}x")


if __name__ == "__main__":
    main()
