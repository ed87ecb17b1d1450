"""From raw-count ``.h5ad`` files to the rank-value corpus: every data step, no torch.

Reading (``h5ad`` streams counts in row chunks, checking them; ``genes`` maps gene ids to Ensembl ids), QC
(``qc``), gene medians (``medians``, ``median_table``), the vocabulary (``vocab``), ranking and writing the corpus
(``tokenizer`` with ``_ranking``, ``_gene_ranker``, ``_corpus``, ``_parquet``), the dataset index over a file's
shards (``corpus_index``), the training store (``store``) and a ``datasets`` directory for Geneformer's tools
(``hf_dataset``). ``cli`` holds the ``gfw`` data commands.
"""
