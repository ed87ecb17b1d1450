from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from geneformer_workflow._pickle import load_plain_pickle
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.vocab import build_token_dictionary, load_token_dictionary, write_vocab_dir
from transformers import AutoTokenizer

from .cases import GENES

DICTIONARIES = Path(__file__).resolve().parents[3] / "shared" / "geneformer-dictionaries"


@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_vocab_dir_loads_in_transformers_with_geneformer_ids(tmp_path, preset):
    tokens = build_token_dictionary(GENES[::-1], PRESETS[preset])
    n_special = 4 if preset == "v2" else 2
    assert list(tokens)[:n_special] == list(PRESETS[preset].specials)
    assert [tokens[g] for g in GENES] == list(range(n_special, n_special + 4))
    write_vocab_dir(tokens, tmp_path / "vocab", max_length=PRESETS[preset].max_length)
    tok = AutoTokenizer.from_pretrained(tmp_path / "vocab")
    assert len(tok) == len(tokens)
    assert tok.convert_tokens_to_ids(GENES) == [tokens[g] for g in GENES]
    assert (tok.pad_token_id, tok.mask_token_id) == (0, 1)
    assert load_token_dictionary(tmp_path / "vocab") == tokens


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "x": _Exploit()}))
    with pytest.raises(ValueError, match="refused to load global"):
        load_plain_pickle(path)
    with pytest.raises(ValueError, match="not a safe Geneformer dictionary"):
        load_token_dictionary(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(not DICTIONARIES.is_dir(), reason="Geneformer's dictionaries are not in ../shared")
@pytest.mark.parametrize(
    ("name", "size"), [("v1/token_dictionary_gc30M.pkl", 25_426), ("v2/token_dictionary_gc104M.pkl", 20_275)]
)
def test_official_geneformer_dictionaries_load_safely(name, size):
    tokens = load_token_dictionary(DICTIONARIES / name)
    assert len(tokens) == size
    assert all(isinstance(v, int) for v in tokens.values())
