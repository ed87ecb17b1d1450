"""State-dict keys of the fused QKV layout (``ModelConfig.fused_qkv``) <-> Hugging Face's three projections.

A fused layer stores ``attention.self.qkv.{weight,bias}`` of shape (3H, H) / (3H,), the concatenation of HF's
``attention.self.{query,key,value}.{weight,bias}`` along dim 0 in that order. Exports split it (a Hugging Face
``BertForMaskedLM`` never sees the fused names); imports into a fused model concatenate. Plain tensor work: keys
may carry any prefix (``module.``, a layer index), tensors may be on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

QKV_PARTS = ("query", "key", "value")  # the order of the blocks in the fused weight
_FUSED_KEY = re.compile(r"^(?P<prefix>.*\battention\.self\.)qkv\.(?P<param>weight|bias)$")
_SPLIT_KEY = re.compile(r"^(?P<prefix>.*\battention\.self\.)(?P<part>query|key|value)\.(?P<param>weight|bias)$")


def split_fused_qkv(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every ``...attention.self.qkv.<p>`` becomes ``...attention.self.{query,key,value}.<p>`` (3 equal chunks of
    dim 0); other entries are kept. A state dict without fused keys comes back unchanged.

    A ``qkv`` entry that cannot be a fused weight (rows not a multiple of 3, or its layer already has a query, key or
    value entry) is kept as it is, never overwriting anything: the key checks after it (``hf.to_hf_state_dict``,
    ``load_state_dict``) then name it as an unknown key.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _FUSED_KEY.match(key)
        targets = [] if match is None else [f"{match['prefix']}{part}.{match['param']}" for part in QKV_PARTS]
        if match is None or tensor.dim() == 0 or tensor.shape[0] % 3 or any(t in state_dict for t in targets):
            out[key] = tensor
            continue
        out.update(zip(targets, tensor.chunk(3, dim=0), strict=True))
    return out


def fuse_qkv(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_fused_qkv`: each complete query / key / value triple becomes one ``qkv`` entry
    (``torch.cat`` along dim 0, at the position of ``query``).

    Raises:
        ValueError: when a layer has only some of the three projections.
    """
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _SPLIT_KEY.match(key)
        if match is not None:
            groups.setdefault((match["prefix"], match["param"]), {})[match["part"]] = tensor
    incomplete = sorted(f"{prefix}*.{param}" for (prefix, param), parts in groups.items() if len(parts) != 3)
    if incomplete:
        msg = f"cannot fuse Q, K, V: these projections lack one of query / key / value: {incomplete[:5]}"
        raise ValueError(msg)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _SPLIT_KEY.match(key)
        if match is None:
            out[key] = tensor
        elif match["part"] == QKV_PARTS[0]:
            parts = groups[(match["prefix"], match["param"])]
            out[f"{match['prefix']}qkv.{match['param']}"] = torch.cat([parts[p] for p in QKV_PARTS], dim=0)
    return out
