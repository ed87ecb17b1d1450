"""User gene-id mapping files: TSV/CSV (comment lines allowed), JSON and Geneformer's pickle; bad tables named."""

from __future__ import annotations

import json
import pickle

import pytest
from geneformer_workflow.tokenize.genes import load_gene_mapping

EXPECTED = {"CD3E": "ENSG00000198851", "LYZ": "ENSG00000090382"}


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".json", ".pkl"])
def test_every_mapping_format_gives_the_same_dict(tmp_path, suffix):
    path = tmp_path / f"mapping{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(EXPECTED))
    elif suffix == ".pkl":
        path.write_bytes(pickle.dumps(EXPECTED))
    else:
        sep = "," if suffix == ".csv" else "\t"
        body = [f"{k}{sep}{v}{sep}x" for k, v in EXPECTED.items()]
        rows = ["# symbols of my panel", f"symbol{sep}ensembl_id{sep}note", *body]
        path.write_text("\n".join([*rows, ""]))
    assert load_gene_mapping(path) == EXPECTED


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("symbol\nCD3E\n", "needs two columns"),
        ("", "needs two columns"),
        ("symbol\tensembl_id\nCD3E\tENSG00000198851\nLYZ\n", "row 3 of the gene mapping table has fewer"),
    ],
)
def test_a_bad_mapping_table_is_named(tmp_path, text, problem):
    path = tmp_path / "mapping.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as info:
        load_gene_mapping(path)
    assert str(path) in str(info.value)
