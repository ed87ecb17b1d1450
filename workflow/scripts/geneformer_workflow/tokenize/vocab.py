"""Vocabulary: the token dictionary (Geneformer's convention) and the vocabulary directory.

Token ids follow Geneformer: the special tokens first (``<pad>``=0, ``<mask>``=1, and for v2
``<cls>``=2, ``<eos>``=3), then the Ensembl gene ids sorted ascending, numbered consecutively.
A vocabulary directory holds everything that pins a vocabulary: our token dictionary, Geneformer's
pickled token and gene median dictionaries, and a Hugging Face tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

from geneformer_workflow.atomic import atomic_path
from geneformer_workflow.presets import CLS, EOS, MASK, PAD, Preset
from geneformer_workflow.tokenize._pickle import load_plain_pickle
from geneformer_workflow.tokenize.h5ad import InputError

TOKEN_DICTIONARY = "token_dictionary.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # records model_max_length: the preset's tokens per cell
GENEFORMER_TOKEN_DICTIONARY = "token_dictionary.pkl"
GENEFORMER_GENE_MEDIANS = "gene_median_dictionary.pkl"
SPECIAL_TOKENS = (PAD, MASK, CLS, EOS)

log = logging.getLogger(__name__)


def build_token_dictionary(gene_ids: Iterable[str], preset: Preset) -> dict[str, int]:
    """Special tokens of ``preset``, then ``gene_ids`` sorted ascending.

    >>> from geneformer_workflow.presets import PRESETS
    >>> build_token_dictionary(["ENSG2", "ENSG1"], PRESETS["v1"])
    {'<pad>': 0, '<mask>': 1, 'ENSG1': 2, 'ENSG2': 3}
    """
    tokens = list(preset.specials) + sorted(set(map(str, gene_ids)))
    return {token: i for i, token in enumerate(tokens)}


def load_token_dictionary(path: str | Path) -> dict[str, int]:
    """Read a token dictionary: our JSON (or a vocabulary dir holding it) or Geneformer's pickle.

    Raises:
        InputError: the file is missing, is not a JSON object (or pickled dict) of integer token ids, or
            fails :func:`check_token_dictionary`.
    """
    from geneformer_workflow.tokenize.genes import read_json_object

    path = Path(path)
    if path.is_dir():
        path = path / TOKEN_DICTIONARY
    if not path.is_file():
        msg = f"{path}: token dictionary not found"
        raise InputError(msg)
    try:
        if path.suffix in (".pkl", ".pickle"):
            raw = load_plain_pickle(path)
        else:
            raw = read_json_object(path, "token dictionary", '{"<pad>": 0, "<mask>": 1, "ENSG...": 2, ...}')
    except ValueError as err:
        raise InputError(str(err)) from err
    bad = next((k for k, v in raw.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad is not None:
        msg = f"{path}: the token id of {bad!r} is {raw[bad]!r}, not an integer"
        raise InputError(msg)
    tokens = {str(k): v for k, v in raw.items()}
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


def write_vocab_dir(
    tokens: dict[str, int],
    out_dir: str | Path,
    *,
    max_length: int,
    gene_medians: Mapping[str, float] | None = None,
) -> Path:
    """Write the vocabulary directory atomically: our token dictionary, Geneformer's pickles, HF tokenizer files.

    Files: ``token_dictionary.json``; ``token_dictionary.pkl`` and (with ``gene_medians``)
    ``gene_median_dictionary.pkl``, the plain pickled dicts Geneformer's tools take as ``token_dictionary_file``
    and ``gene_median_file``; and a Hugging Face tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``vocab.txt``). ``transformers.AutoTokenizer.from_pretrained(out_dir)`` gives the
    token dictionary's ids with its default ``add_special_tokens=True``: nothing added for a v1 vocabulary,
    ``<cls>`` … ``<eos>`` for v2; see :func:`hf_tokenizer_files`.

    Args:
        tokens: The token dictionary (see :func:`check_token_dictionary`).
        out_dir: The directory to write; an earlier vocabulary directory there is replaced.
        max_length: Tokens per cell of the preset (the tokenizer's ``model_max_length``).
        gene_medians: Gene medians by Ensembl id; only the token dictionary's genes are written.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        InputError: a bad token dictionary, a non-positive median, or medians sharing no gene with ``tokens``.

    >>> import json, tempfile
    >>> from geneformer_workflow.presets import PRESETS
    >>> tokens = build_token_dictionary(["ENSG2", "ENSG1"], PRESETS["v1"])
    >>> out = write_vocab_dir(tokens, Path(tempfile.mkdtemp()) / "vocab", max_length=2048,
    ...                       gene_medians={"ENSG1": 1.5, "ENSG2": 0.5, "ENSG3": 2.0})
    >>> sorted(p.name for p in out.iterdir())  # doctest: +NORMALIZE_WHITESPACE
    ['gene_median_dictionary.pkl', 'special_tokens_map.json', 'token_dictionary.json', 'token_dictionary.pkl',
     'tokenizer.json', 'tokenizer_config.json', 'vocab.txt']
    >>> json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    {'<pad>': 0, '<mask>': 1, 'ENSG1': 2, 'ENSG2': 3}
    """
    check_token_dictionary(tokens, out_dir)
    medians = None if gene_medians is None else vocabulary_medians(tokens, gene_medians, out_dir)
    files = hf_tokenizer_files(tokens, max_length=max_length)
    with atomic_path(out_dir, directory=True) as tmp:
        tmp.mkdir()
        (tmp / TOKEN_DICTIONARY).write_text(json.dumps(tokens, indent=0) + "\n")
        # Geneformer's own tools take `token_dictionary_file=` and `gene_median_file=` as pickled plain dicts.
        with open(tmp / GENEFORMER_TOKEN_DICTIONARY, "wb") as fh:
            pickle.dump(dict(tokens), fh, protocol=4)
        if medians is not None:
            with open(tmp / GENEFORMER_GENE_MEDIANS, "wb") as fh:
                pickle.dump(medians, fh, protocol=4)
        for name, text in files.items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def vocabulary_medians(
    tokens: Mapping[str, int], gene_medians: Mapping[str, float], source: str | Path
) -> dict[str, float]:
    """The medians of the token dictionary's genes, in token id order, as plain ``str -> float``.

    Geneformer's ``TranscriptomeTokenizer`` looks up the token of every gene in its median dictionary, so a
    median without a token would fail there; genes with a token but no median simply never become tokens.

    Raises:
        InputError: a median that is not a positive finite number, or no gene in common.
    """
    genes = [g for g in sorted(tokens, key=tokens.__getitem__) if g not in SPECIAL_TOKENS]
    medians = {g: float(gene_medians[g]) for g in genes if g in gene_medians}
    bad = [g for g, m in medians.items() if not (m > 0 and math.isfinite(m))]
    if bad:
        msg = f"{source}: {len(bad)} gene medians are not positive finite numbers (e.g. {bad[0]}={medians[bad[0]]})"
        raise InputError(msg)
    if genes and not medians:
        msg = (
            f"{source}: none of the {len(genes):,} genes of the token dictionary has a gene median; the token "
            "dictionary and the gene medians come from different vocabularies — pass the matching pair"
        )
        raise InputError(msg)
    if len(medians) < len(genes):
        log.warning(
            "%s: %d of %d genes of the token dictionary have no gene median; they never become tokens",
            source,
            len(genes) - len(medians),
            len(genes),
        )
    return medians


def hf_tokenizer_files(tokens: dict[str, int], *, max_length: int) -> dict[str, str]:
    """The Hugging Face tokenizer files of a vocabulary: file name -> text.

    A ``tokenizers`` serialization (``tokenizer.json``: a WordLevel model over the token dictionary, splitting on
    whitespace, case-sensitive; an id not in the vocabulary becomes ``<pad>``) loaded as the generic
    ``PreTrainedTokenizerFast``. Its post-processor is the only place special tokens are added:
    none for v1, ``<cls>`` … ``<eos>`` for v2.

    Why not ``BertTokenizer``: transformers 5 rebuilds its post-processor from ``cls_token``/``sep_token``
    (with none, a token named "None" is added with a wrong id), transformers 4.x's Python ``BertTokenizer``
    always adds them (a v1 vocabulary has none), and 4.x converts it to a fast tokenizer by a path that
    fails without them. ``PreTrainedTokenizerFast`` reads ``tokenizer.json`` as written in every version
    from 4.46 on; there is no Python ("slow") form, so ``use_fast=False`` gets the same tokenizer.
    ``vocab.txt`` (one token per line, in id order) is kept for people and older tools.
    """
    ordered = sorted(tokens, key=tokens.__getitem__)
    specials = {"pad_token": PAD, "mask_token": MASK, "unk_token": PAD}
    if has_special_tokens(tokens):
        specials |= {"cls_token": CLS, "sep_token": EOS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": json.dumps(_tokenizers_json(tokens), indent=1) + "\n",
        TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
        "vocab.txt": "\n".join(ordered) + "\n",
    }


def _tokenizers_json(tokens: dict[str, int]) -> dict:
    """A ``tokenizers.Tokenizer`` serialization (format "1.0"; read by tokenizers 0.20 and 0.23)."""
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    added = [{"id": tokens[t], "content": t, **flags} for t in SPECIAL_TOKENS if t in tokens]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        # v1: none, the ids are the genes' ids; v2: <cls> genes <eos>.
        "post_processor": _cls_eos_template(tokens) if has_special_tokens(tokens) else None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": dict(sorted(tokens.items(), key=lambda kv: kv[1])), "unk_token": PAD},
    }


def _cls_eos_template(tokens: dict[str, int]) -> dict:
    """A ``TemplateProcessing`` post-processor: ``<cls> A <eos>`` (and ``<cls> A <eos> B <eos>`` for pairs)."""
    cls, eos = {"SpecialToken": {"id": CLS, "type_id": 0}}, {"SpecialToken": {"id": EOS, "type_id": 0}}
    single = [cls, {"Sequence": {"id": "A", "type_id": 0}}, eos]
    pair = [*single, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": EOS, "type_id": 1}}]
    special_tokens = {t: {"id": t, "ids": [tokens[t]], "tokens": [t]} for t in (CLS, EOS)}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}
