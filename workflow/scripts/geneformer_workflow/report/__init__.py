"""The figures and tables of the Snakemake report, one module per output (``gfw plot``: :mod:`.cli`).

``corpus`` (per-file summary, tokens per cell), ``training`` (loss, throughput), ``umap`` (cell embeddings),
``configuration`` (the run's configuration); ``_common`` holds the page and figure plumbing they share.
"""
