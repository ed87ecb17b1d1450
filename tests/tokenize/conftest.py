from __future__ import annotations

import pandas as pd
import pytest

from .cases import GENES, MEDIANS


@pytest.fixture
def medians_tsv(tmp_path):
    path = tmp_path / "gene_medians.tsv"
    pd.DataFrame({"ensembl_id": GENES, "median": MEDIANS.values, "n_cells_detected": 1}).to_csv(
        path, sep="\t", index=False
    )
    return path
