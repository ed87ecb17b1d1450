"""Geneformer workflow: tokenize AnnData into rank-value corpora and pretrain BERT masked-LMs."""

from __future__ import annotations

__version__ = "0.1.0"
