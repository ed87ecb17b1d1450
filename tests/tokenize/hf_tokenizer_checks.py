"""Checks that ``AutoTokenizer`` gives a vocabulary directory's token ids with its default arguments.

Standard library + ``transformers`` only, so the same checks run in the project's environment (imported by
``test_hf_tokenizer_versions.py``) and, as a script, in a light environment with the oldest transformers we
claim:

    python hf_tokenizer_checks.py VOCAB_DIR [VOCAB_DIR ...]

Each directory is checked as written by ``gfw vocab`` and as it sits in an exported model directory (next to a
BERT ``config.json``, which makes transformers 5 consult the model type), with ``use_fast=True`` and
``use_fast=False``: ids of single cells and batches, as text and as pre-split gene lists, with and without the
special tokens, padded, truncated, unknown genes, decoding.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer

UNKNOWN_GENE = "ENSG99999999999"


def check_vocab_dir(vocab_dir: Path) -> str:
    """Run every check on ``vocab_dir`` (AssertionError on the first failure); returns a one-line summary."""
    vocab_dir = Path(vocab_dir)
    tokens = json.loads((vocab_dir / "token_dictionary.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        shutil.copytree(vocab_dir, model_dir)
        config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": len(tokens)}
        (model_dir / "config.json").write_text(json.dumps(config))
        for directory in (vocab_dir, model_dir):
            for use_fast in (True, False):
                tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=use_fast)
                _check_tokenizer(tokenizer, tokens, f"{directory.name} (use_fast={use_fast})")
    kind = "<cls> ... <eos>" if "<cls>" in tokens else "no special tokens"
    return f"transformers {transformers.__version__}: {vocab_dir.name} ({len(tokens)} tokens, {kind}) ok"


def _check_tokenizer(tokenizer: object, tokens: dict[str, int], label: str) -> None:
    """All checks on one loaded tokenizer."""
    v2 = "<cls>" in tokens and "<eos>" in tokens
    genes = [t for t in sorted(tokens, key=tokens.__getitem__) if not t.startswith("<")]
    cells = [genes[::-1][:7], genes[3:4], genes[1::5], genes[:40]]
    bare = [[tokens[g] for g in cell] for cell in cells]
    expected = [_wrap(ids, tokens) if v2 else ids for ids in bare]
    texts = [" ".join(cell) for cell in cells]

    assert len(tokenizer) == len(tokens), f"{label}: {len(tokenizer)} tokens, the dictionary has {len(tokens)}"
    assert tokenizer.get_vocab() == tokens, f"{label}: vocabulary differs from token_dictionary.json"
    assert (tokenizer.pad_token_id, tokenizer.mask_token_id) == (0, 1), label
    if v2:
        assert (tokenizer.cls_token_id, tokenizer.sep_token_id) == (tokens["<cls>"], tokens["<eos>"]), label
    else:
        assert tokenizer.cls_token is None and tokenizer.sep_token is None, label

    # Default arguments (add_special_tokens=True): a batch of texts, pre-split lists, one cell, the call.
    assert tokenizer(texts)["input_ids"] == expected, f"{label}: batch of texts"
    assert tokenizer(cells, is_split_into_words=True)["input_ids"] == expected, f"{label}: pre-split genes"
    assert tokenizer(texts[0])["input_ids"] == expected[0], f"{label}: one cell"
    assert tokenizer([genes[0]])["input_ids"] == [_wrap([tokens[genes[0]]], tokens) if v2 else [tokens[genes[0]]]]
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == bare, f"{label}: add_special_tokens=False"
    assert set(tokenizer(texts[0])) == {"input_ids", "attention_mask"}, f"{label}: model inputs"

    # <mask> in text is the mask token; an unknown gene becomes <pad> (id 0), like a gene that is absent.
    masked = tokenizer(f"<mask> {genes[0]} {UNKNOWN_GENE}")["input_ids"]
    assert masked == (_wrap([1, tokens[genes[0]], 0], tokens) if v2 else [1, tokens[genes[0]], 0]), label

    # Padding with <pad>=0 and a zero attention mask; the special tokens stay at both ends of the real tokens.
    padded = tokenizer(texts, padding=True)
    width = max(map(len, expected))
    assert padded["input_ids"] == [e + [0] * (width - len(e)) for e in expected], f"{label}: padding"
    assert padded["attention_mask"] == [[1] * len(e) + [0] * (width - len(e)) for e in expected], label

    # Truncation keeps the highest-ranked genes (the first), and for v2 still ends with <eos>.
    for max_length in (4, 9):
        got = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        keep = max_length - 2 if v2 else max_length
        assert got == [_wrap(ids[:keep], tokens) if v2 else ids[:keep] for ids in bare], f"{label}: truncation"
    limit = tokenizer.model_max_length
    assert limit == json.loads(Path(tokenizer.name_or_path, "tokenizer_config.json").read_text())["model_max_length"]
    long_cell = (genes * (limit // len(genes) + 2))[: limit + 5]
    ids = tokenizer(" ".join(long_cell), truncation=True)["input_ids"]
    assert len(ids) == limit and (ids[-1] == tokens["<eos>"] if v2 else ids[-1] == tokens[long_cell[limit - 1]])

    assert [tokenizer.decode(e, skip_special_tokens=True) for e in expected] == texts, f"{label}: decode"


def _wrap(ids: list[int], tokens: dict[str, int]) -> list[int]:
    """A v2 cell: ``<cls>`` genes ``<eos>``."""
    return [tokens["<cls>"], *ids, tokens["<eos>"]]


def main(argv: list[str]) -> int:
    """Check every directory in ``argv``; prints one line per directory."""
    if not argv:
        print(__doc__)
        return 2
    for directory in argv:
        print(check_vocab_dir(Path(directory)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
