"""``gfw export``: a training checkpoint → a Hugging Face ``BertForMaskedLM`` directory.

Runs on one process without a process group: DCP reassembles the shards that all ranks wrote.

    gfw export results/train/10m results/export/10m              # run dir: final.json, else the newest step
    gfw export results/train/10m/checkpoints/step_5000 out/ --vocab-dir results/vocab
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import OutputError, check_outputs
from ..model import save_hf_state_dict
from .checkpoint import CheckpointError, load_checkpoint_model, resolve_checkpoint

__all__ = ["cli_main", "export_checkpoint", "load_checkpoint_model", "resolve_checkpoint"]


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, vocab_dir: str | Path | None = None, overwrite: bool = True
) -> Path:
    """Export a checkpoint as a Hugging Face directory (config.json, model.safetensors, vocab files).

    Args:
        checkpoint: A run directory or a ``checkpoints/step_<n>`` directory.
        out_dir: Target directory, written atomically; an existing one is replaced only with ``overwrite`` and only
            when it holds nothing but an earlier export's files.
        vocab_dir: Vocabulary files to ship; default: the ``vocab_dir`` recorded in the checkpoint.

    Returns:
        ``out_dir``.
    """
    model, meta = load_checkpoint_model(checkpoint)
    vocab = vocab_dir if vocab_dir is not None else meta.get("vocab_dir")
    if vocab is not None and not Path(vocab).is_dir():
        msg = f"vocab dir {vocab} (recorded in the checkpoint) does not exist; pass --vocab-dir"
        raise FileNotFoundError(msg)
    return save_hf_state_dict(
        model.state_dict(), model.config, out_dir, vocab_dir=vocab, overwrite=overwrite, inputs=[checkpoint]
    )


def build_parser() -> argparse.ArgumentParser:
    """``gfw export`` arguments."""
    parser = argparse.ArgumentParser(
        prog="gfw export", description="Export a training checkpoint as a Hugging Face BertForMaskedLM directory."
    )
    parser.add_argument(
        "checkpoint", help="run directory (uses final.json, else the newest checkpoint) or step_<n> dir"
    )
    parser.add_argument("out_dir", help="output directory (must not exist, unless --overwrite)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing export (a directory holding other files is never replaced)",
    )
    parser.add_argument(
        "--vocab-dir", default=None, help="tokenizer/vocabulary files to copy (default: the one recorded at training)"
    )
    return parser


def cli_main(argv: list[str]) -> int:
    """Entry point of ``gfw export``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        check_outputs(
            [args.out_dir], inputs=[args.checkpoint, args.vocab_dir], overwrite=args.overwrite, directory=True
        )
        out = export_checkpoint(args.checkpoint, args.out_dir, vocab_dir=args.vocab_dir, overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, OutputError) as err:
        print(f"gfw export: error: {err}")
        return 1
    print(f"exported {resolve_checkpoint(args.checkpoint)} to {out}")
    return 0
