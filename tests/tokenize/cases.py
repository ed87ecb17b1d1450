from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd

GENES = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003", "ENSG00000000004"]
MEDIANS = pd.Series([1.0, 2.0, 0.5, 1.0], index=GENES)
# Hand-checkable cells. Values ~ count / median (n_counts is common to a cell):
#   cell0: G1 4, G2 2, G3 2 (tie -> ascending token id), G4 absent  -> G1 G2 G3
#   cell1: G4 only                                                   -> G4
#   cell2: G1 1, G3 6, G4 2                                          -> G3 G4 G1
COUNTS = np.array([[4, 4, 1, 0], [0, 0, 0, 3], [1, 0, 3, 2]], dtype=np.float32)
EXPECTED_GENES = [["G1", "G2", "G3"], ["G4"], ["G3", "G4", "G1"]]


def run_gfw(*args: object) -> tuple[int, str]:
    """``gfw ARGS`` in this process (the real ``geneformer_workflow.cli.main``): its exit status and its stderr.

    argparse errors exit through ``SystemExit``; their status is returned like the others.
    """
    from geneformer_workflow.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()
