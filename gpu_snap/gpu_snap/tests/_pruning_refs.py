"""Independent references for in-LLM visual token pruning (used by the test files, not by vprune).

- ``masked_reference``: the *unpatched* model where, from decoder layer K on, the pruned tokens are
  hidden as keys (an explicit 4-D mask: causal & padding & kept columns). Every kept token's output
  must equal what the pruned model computes for it: this is the correctness test of pruning
  (hidden states, cos/sin, masks, positions all sliced consistently).
- ``fastv_reference``: the keep set FastV defines, from the unpatched model's own attention
  probabilities under eager attention with ``output_attentions=True``: top-k of the last row of layer
  K-1, heads averaged, per image, ties to the lower index.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch

_CTX: Dict[str, object] = {}
_NAME = "test_masked_reference"


def _masked_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = module.layer_idx
    n = key.shape[-2]
    allowed = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()  # causal, prefill only
    allowed = allowed.view(1, 1, n, n)
    valid = _CTX.get("key_valid")
    if valid is not None:
        allowed = allowed & valid.view(valid.shape[0], 1, 1, n)
    if layer >= _CTX["layer"]:
        allowed = allowed & _CTX["kept_cols"].view(-1, 1, 1, n)
    # a fully masked (padding) query row would give NaN: let it see itself (its output is never compared)
    eye = torch.eye(n, dtype=torch.bool, device=query.device).view(1, 1, n, n)
    allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, allowed, is_causal=False, **kwargs)


@contextlib.contextmanager
def _text_attention(model, name: str):
    cfg = model.config.get_text_config()
    old = cfg.__dict__.get("_attn_implementation_internal")
    object.__setattr__(cfg, "_attn_implementation_internal", name)
    try:
        yield
    finally:
        object.__setattr__(cfg, "_attn_implementation_internal", old)


def kept_columns(input_ids: torch.Tensor, visual: torch.Tensor, kept_indices: Sequence[Sequence[int]]) -> torch.Tensor:
    """bool [B, L]: every non-visual token plus the kept visual ones."""
    cols = ~visual.clone()
    for b, idx in enumerate(kept_indices):
        cols[b, list(idx)] = True
    return cols


@torch.no_grad()
def masked_reference(model, inputs: dict, layer: int, kept_cols: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] of the unpatched ``model`` with non-kept columns masked from ``layer`` on."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(_NAME, _masked_attention)
    AttentionMaskInterface.register(_NAME, sdpa_mask)
    am = inputs.get("attention_mask")
    _CTX.update(layer=layer, kept_cols=kept_cols, key_valid=am.bool() if am is not None else None)
    try:
        with _text_attention(model, _NAME):
            return model(**inputs).logits
    finally:
        _CTX.clear()
        AttentionInterface._global_mapping.pop(_NAME, None)
        AttentionMaskInterface._global_mapping.pop(_NAME, None)


@torch.no_grad()
def fastv_reference(model, inputs: dict, layer: int, groups: List[List[Sequence[int]]],
                    budgets: List[List[int]], rows: Optional[torch.Tensor] = None) -> List[List[int]]:
    """Kept visual positions per row: top-k of layer ``layer``-1's last-row attention (eager), per image.

    rows: optional bool [B, L] query rows to average instead of the last one (the ``semantic`` score).
    """
    with _text_attention(model, "eager"):
        out = model(**inputs, output_attentions=True)
    att = out.attentions[layer - 1]  # [B, H, L, L]
    if rows is None:
        scores = att[:, :, -1, :].float().mean(dim=1)  # [B, L]: FastV's last row, head mean
    else:  # mean over the given query rows (bool [B, L]) of the head-mean attention
        w = rows.float()
        scores = (att.float().mean(dim=1) * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    kept: List[List[int]] = []
    for b, (row, ks) in enumerate(zip(groups, budgets)):
        chosen: List[int] = []
        for g, k in zip(row, ks):
            pos = list(g)
            s = scores[b, pos]
            order = sorted(range(len(pos)), key=lambda i: (-float(s[i]), i))  # ties to the lower index
            chosen += sorted(pos[i] for i in order[:k])
        kept.append(sorted(chosen))
    return kept
