"""The ``sanity`` tier on the real demo corpus: it learns, and its loss curve matches the committed reference.

The reference ``tests/data/sanity_losses.txt`` holds one ``step loss`` line per step of the sanity config (2
processes, FSDP2, seed 42) on the demo corpus tokenized by ``gfw``. A change that should not alter the maths must
reproduce it; one that does (model, masking, sampler, optimizer, tokenizer) must update it on purpose::

    UPDATE_SANITY_LOSSES=1 .venv/bin/python -m pytest tests/train/test_sanity_demo.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from .conftest import REPO, read_metrics, run_training, train_losses

pytestmark = pytest.mark.slow

REFERENCE = REPO / "tests" / "data" / "sanity_losses.txt"
# Same machine kind and torch pin give identical losses; the tolerance absorbs other BLAS builds and CPUs.
LOSS_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def sanity_demo_run(demo_corpus, tmp_path_factory) -> tuple[Path, float]:
    """The sanity tier as shipped (2 processes), logging every step; returns the run dir and its wall time."""
    run_dir = tmp_path_factory.mktemp("sanity_demo")
    started = time.perf_counter()
    run_training(2, demo_corpus.overrides(run_dir, "wandb.mode=disabled", "logging.log_every=1"), timeout=240)
    return run_dir, time.perf_counter() - started


def test_sanity_tier_lowers_the_validation_loss_on_real_cells(sanity_demo_run):
    run_dir, elapsed = sanity_demo_run
    validation = {r["step"]: r["validation/loss"] for r in read_metrics(run_dir) if "validation/loss" in r}
    print(f"sanity on the demo corpus: {elapsed:.1f} s wall, validation loss {validation}")
    assert sorted(validation) == [10, 20, 30, 40]
    first, last = validation[10], validation[40]
    assert last < first - 0.1, f"validation loss {first:.4f} -> {last:.4f}: the sanity tier no longer learns"
    assert elapsed < 120, f"the sanity run took {elapsed:.0f} s"  # ~35 s on 2 busy cores; a generous guard


def test_sanity_loss_curve_matches_the_reference(sanity_demo_run):
    losses = train_losses(sanity_demo_run[0])
    assert sorted(losses) == list(range(1, 41))
    if os.environ.get("UPDATE_SANITY_LOSSES") == "1":
        REFERENCE.write_text("".join(f"{step} {loss:.6f}\n" for step, loss in sorted(losses.items())))
    reference = {int(s): float(v) for s, v in (line.split() for line in REFERENCE.read_text().splitlines())}
    assert losses == pytest.approx(reference, abs=LOSS_TOLERANCE, rel=0)
