"""What every report output shares: matplotlib without a display, atomic figure writes, small HTML pages."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geneformer_workflow.atomic import atomic_path

_CSS = (
    "body{font-family:sans-serif;font-size:14px;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
    "pre{background:#f7f7f7;border:1px solid #ddd;padding:8px;font-size:12px}"
)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: str | Path, **savefig: Any) -> None:
    with atomic_path(out) as tmp:
        save_to(fig, tmp, **savefig)


def save_to(fig: Any, out: Path, **savefig: Any) -> None:
    """Write and close ``fig``; the format follows ``out``'s suffix."""
    fig.savefig(out, format=out.suffix.lstrip(".") or "png", dpi=100, **savefig)
    pyplot().close(fig)


def html_page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n"
    )


def table_html(frame: pd.DataFrame, *, float_format: str = ",.1f") -> str:
    """``frame`` as an HTML table; integers with thousands separators, other numbers as ``float_format``."""

    def cell(value: Any) -> str:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            return str(value)
        if isinstance(value, (int, np.integer)):
            return f"{value:,}"
        return "–" if math.isnan(value) else format(value, float_format)

    return frame.astype(object).map(cell).to_html()
