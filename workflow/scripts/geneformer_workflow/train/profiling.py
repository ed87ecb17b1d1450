"""Optional ``torch.profiler`` capture of a few training steps (``logging.profile_steps: [first, last]``).

Writes, per rank, ``run_dir/profile/rank<r>_steps<first>-<last>.txt`` (the operators with the most self time on the
GPU, or on the CPU without one) and a Chrome / Perfetto trace ``.json`` next to it. Steps are 1-based, as in the
metrics file; the profiled steps run slower, so their train/step_time is not representative.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)


class StepProfiler:
    """Profiles optimizer steps ``first..last`` (1-based, inclusive); a no-op when ``steps`` is None."""

    def __init__(self, steps: list[int] | tuple[int, int] | None, out_dir: Path, device: torch.device, rank: int):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        if steps and not 1 <= self.first <= self.last:
            msg = f"logging.profile_steps={list(steps)} must be [first, last] with 1 <= first <= last"
            raise ValueError(msg)
        self.out_dir, self.device, self.rank = out_dir, device, rank
        self._profiler: profile | None = None

    def before_step(self, step: int) -> None:
        """Call before running 1-based step ``step``."""
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profiler = profile(activities=activities)
            self._profiler.__enter__()

    def after_step(self, step: int) -> None:
        """Call after step ``step`` finished; writes the report after the last profiled step."""
        if self._profiler is None or step < self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profiler.__exit__(None, None, None)
        profiler, self._profiler = self._profiler, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}_steps{self.first}-{self.last}"
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=40)
        stem.with_suffix(".txt").write_text(table + "\n")
        profiler.export_chrome_trace(str(stem.with_suffix(".json")))
        log.info("profile of steps %d-%d written to %s.{txt,json}", self.first, self.last, stem)
