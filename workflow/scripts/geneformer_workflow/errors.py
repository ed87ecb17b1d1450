"""Error types shared by the stages (the stage-specific ones live beside their code, e.g. ``CheckpointError``)."""

from __future__ import annotations


class SetupError(RuntimeError):
    """This machine lacks what the chosen settings need (CUDA, Transformer Engine, megatron-fsdp).

    The message names the setting and the fix, so commands print it on one line without a traceback. A
    ``RuntimeError`` for code that catches those.
    """
