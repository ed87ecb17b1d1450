"""Vocabulary: the token dictionary (Geneformer's convention) and a Hugging Face tokenizer directory.

Token ids follow Geneformer: the special tokens first (``<pad>``=0, ``<mask>``=1, and for v2
``<cls>``=2, ``<eos>``=3), then the Ensembl gene ids sorted ascending, numbered consecutively.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterable
from pathlib import Path

from geneformer_workflow._atomic import atomic_path
from geneformer_workflow._io import InputError
from geneformer_workflow._pickle import load_plain_pickle
from geneformer_workflow.presets import CLS, EOS, MASK, PAD, Preset

TOKEN_DICTIONARY = "token_dictionary.json"
GENEFORMER_TOKEN_DICTIONARY = "token_dictionary.pkl"


def build_token_dictionary(gene_ids: Iterable[str], preset: Preset) -> dict[str, int]:
    """Special tokens of ``preset``, then ``gene_ids`` sorted ascending.

    >>> from geneformer_workflow.presets import PRESETS
    >>> build_token_dictionary(["ENSG2", "ENSG1"], PRESETS["v1"])
    {'<pad>': 0, '<mask>': 1, 'ENSG1': 2, 'ENSG2': 3}
    """
    tokens = list(preset.specials) + sorted(set(map(str, gene_ids)))
    return {token: i for i, token in enumerate(tokens)}


def load_token_dictionary(path: str | Path) -> dict[str, int]:
    """Read a token dictionary: our JSON (or a vocabulary dir holding it) or Geneformer's pickle."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKEN_DICTIONARY
    if not path.is_file():
        msg = f"{path}: token dictionary not found"
        raise InputError(msg)
    raw = load_plain_pickle(path) if path.suffix in (".pkl", ".pickle") else json.loads(path.read_text())
    tokens = {str(k): int(v) for k, v in raw.items()}
    check_token_dictionary(tokens, path)
    return tokens


def check_token_dictionary(tokens: dict[str, int], source: str | Path) -> None:
    """Ids must be 0..n-1 without gaps, with ``<pad>``=0 and ``<mask>`` present."""
    if tokens.get(PAD) != 0 or MASK not in tokens:
        msg = f"{source}: a token dictionary needs <pad>=0 and a <mask> token"
        raise InputError(msg)
    if sorted(tokens.values()) != list(range(len(tokens))):
        msg = f"{source}: token ids are not the consecutive integers 0..{len(tokens) - 1}"
        raise InputError(msg)


def has_special_tokens(tokens: dict[str, int]) -> bool:
    """Whether the vocabulary has ``<cls>`` and ``<eos>`` (the v2 convention)."""
    return CLS in tokens and EOS in tokens


def token_dictionary_sha256(tokens: dict[str, int]) -> str:
    """A checksum of the (token, id) pairs, to tie corpora and models to their vocabulary."""
    canonical = json.dumps(sorted(tokens.items(), key=lambda kv: kv[1]), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_vocab_dir(tokens: dict[str, int], out_dir: str | Path, *, max_length: int) -> Path:
    """Write ``token_dictionary.json`` (+ Geneformer's ``.pkl`` form) and the HF tokenizer files, atomically.

    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it (a ``BertTokenizer`` over the
    gene ids; unknown genes map to ``<pad>``, so they are ignored like absent genes).
    """
    check_token_dictionary(tokens, out_dir)
    ordered = sorted(tokens, key=tokens.__getitem__)
    specials = {"pad_token": PAD, "mask_token": MASK, "unk_token": PAD}
    if has_special_tokens(tokens):
        specials |= {"cls_token": CLS, "sep_token": EOS}
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": False,
        "tokenize_chinese_chars": False,
        "strip_accents": False,
        "cls_token": None,
        "sep_token": None,
        **specials,
        "model_max_length": max_length,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / TOKEN_DICTIONARY).write_text(json.dumps(tokens, indent=0) + "\n")
        # Geneformer's own tools take `token_dictionary_file=` as a pickled plain dict.
        with open(tmp / GENEFORMER_TOKEN_DICTIONARY, "wb") as fh:
            pickle.dump(dict(tokens), fh, protocol=4)
        (tmp / "vocab.txt").write_text("\n".join(ordered) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return Path(out_dir)
