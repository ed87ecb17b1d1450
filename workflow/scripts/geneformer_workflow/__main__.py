"""``python -m geneformer_workflow`` is the ``gfw`` command."""

from __future__ import annotations

import sys

from geneformer_workflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
