"""``snakemake --report``: one self-contained HTML file with every figure, which renders in headless Chromium.

Chromium comes from ``tests/workflow/install_chromium.sh`` (Debian package); without it the rendering test is
skipped with that hint. The screenshots are kept in the test's temporary directory for a human to look at.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .helpers import REPO, run_snakemake, write_config

pytestmark = pytest.mark.slow

# file name -> report category (see workflow/rules/{qc,report,embed}.smk)
FIGURES = {
    "qc.png": "1. Quality control",
    "corpus_summary.html": "2. Corpus",
    "cell_lengths.png": "2. Corpus",
    "loss.png": "3. Pretraining",
    "throughput.png": "3. Pretraining",
    "umap.png": "4. Cell embeddings",
    "configuration.html": "5. Configuration",
    "scores.html": "6. Evaluation",
    "umap_by_label.png": "6. Evaluation",
}
EVALUATION = {"path": str(REPO / "resources/demo/pbmc_cite_seq_labelled.h5ad"), "label_key": "cell_type"}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]
# Virtual milliseconds to let React render before the screenshot; a busy machine (CI runs the whole suite on 2
# cores) may need more, so a page that looks blank is shot again with the next budget before the test fails.
RENDER_BUDGETS_MS = (10_000, 30_000, 90_000)
WINDOW = (1600, 1000)
# Opens one result the way a click does: its caption in the side bar, the figure in the content area.
SHOW_RESULT = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const path = Object.keys(results).find((p) => p.endsWith("/%(name)s"));
  const category = Object.keys(categories).find((c) => Object.values(categories[c]).some((l) => l.includes(path)));
  const subcategory = Object.keys(categories[category]).find((s) => categories[category][s].includes(path));
  const content = results[path].mime_type === "text/html" ? "html" : "img";
  app.setView({navbarMode: "resultinfo", category: category, subcategory: subcategory, content: content,
               contentPath: results[path].data_uri, resultPath: path});
}, 200));
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The demo workflow (6 training steps) and its report."""
    workdir = tmp_path_factory.mktemp("report")
    overrides = ["training.max_steps=6", "checkpoint.save_every=3", "logging.log_every=2", "logging.eval_every=3"]
    write_config(workdir, pretrain={"nproc_per_node": 2, "overrides": overrides}, evaluate={"datasets": [EVALUATION]})
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    result = run_snakemake(workdir, "--report", "report.html", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "report.html"


def _embedded(text: str, variable: str) -> dict:
    """A JSON object that the report assigns to a JavaScript ``var``."""
    match = re.search(rf"var {variable} = (\{{.*?\}});\n", text, re.S)
    assert match, f"the report has no {variable}"
    return json.loads(match.group(1))


def _result(results: dict, name: str) -> dict:
    paths = [path for path in results if path.endswith("/" + name)]
    assert len(paths) == 1, f"{name}: {paths}"
    return results[paths[0]]


def _decoded(result: dict) -> str:
    return base64.b64decode(result["data_uri"].split(",", 1)[1]).decode()


def test_report_is_self_contained_with_every_figure_its_caption_and_category(report):
    text = report.read_text()
    results, categories = _embedded(text, "results"), _embedded(text, "categories")
    for name, category in FIGURES.items():
        result = _result(results, name)
        assert result["data_uri"].startswith("data:"), name
        assert len(result["caption"]) > 200, f"{name} has no caption saying how to read it"
        in_category = [p for paths in categories[category].values() for p in paths]
        assert any(p.endswith("/" + name) for p in in_category), f"{name} is not in {category}"
    # Nothing is fetched from the network when the report is opened.
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"<link[^>]+href=[\"']https?:", text)
    summary = _decoded(_result(results, "corpus_summary.html"))
    assert "pbmc_5k_protein_v3" in summary and "vocabulary size" in summary and "genes mapped" in summary
    configuration = _decoded(_result(results, "configuration.html"))
    assert "max_steps: 6" in configuration  # the composed training config, with the workflow's overrides
    assert "parameters" in configuration and "world_size" in configuration


def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _screenshot(chromium: str, page: Path, out: Path, profile: Path, *, budget_ms: int) -> np.ndarray:
    """Render ``page`` in headless Chromium; the screenshot as an (H, W, 3) uint8 array."""
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--virtual-time-budget={budget_ms}",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--screenshot={out}",
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and out.is_file(), result.stderr[-3000:]
    import matplotlib.image

    return (matplotlib.image.imread(out)[..., :3] * 255).round().astype(np.uint8)


def _blank(pixels: np.ndarray, what: str, *, min_colours: int, max_background: float) -> str | None:
    """Why the picture looks blank (too few colours, or one colour covering nearly everything), or None."""
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    background = counts.max() / counts.sum()
    if len(colours) < min_colours:
        return f"{what}: only {len(colours)} distinct colours; a blank page?"
    if background > max_background:
        return f"{what}: {background:.1%} of the pixels have one colour; a blank page?"
    return None


def _assert_renders(chromium: str, page: Path, out: Path, profile: Path, what: str, *, crop=None, **limits) -> None:
    """Screenshot ``page`` until it is not blank, with growing render budgets; fail naming the last problem."""
    problems = []
    for budget in RENDER_BUDGETS_MS:
        pixels = _screenshot(chromium, page, out, profile, budget_ms=budget)
        problem = _blank(pixels if crop is None else crop(pixels), what, **limits)
        if problem is None:
            return
        problems.append(f"{problem} (after {budget} ms)")
    pytest.fail("; ".join(problems))


def test_report_renders_every_figure_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed; run tests/workflow/install_chromium.sh (needs root or sudo)")
    _assert_renders(
        chromium,
        report,
        tmp_path / "landing.png",
        tmp_path / "profile",
        "landing page",
        min_colours=200,
        max_background=0.95,
    )
    html = report.read_text()
    end = html.rindex("</body>")
    for name in FIGURES:
        page = tmp_path / f"show_{name}.html"
        page.write_text(html[:end] + SHOW_RESULT % {"name": name} + html[end:])
        _assert_renders(
            chromium,
            page,
            tmp_path / f"{name}.png",
            tmp_path / "profile",
            f"{name} in the report",
            crop=_figure_area,
            min_colours=50,
            max_background=0.995,
        )


def _figure_area(pixels: np.ndarray) -> np.ndarray:
    """Right of the side bar, above the bottom: where the report shows the opened figure."""
    return pixels[: int(WINDOW[1] * 0.8), int(WINDOW[0] * 0.55) :]
