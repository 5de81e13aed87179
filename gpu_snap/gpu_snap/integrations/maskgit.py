"""NATCache for MaskGIT-style token transformers built from timm ``Block``s (the vprune testbed).

Tested on: vprune testbed ``TinyMaskGIT`` (vprune 0.1.0), timm 1.0.31, torch 2.14.

Host contract (checked by ``check_structure``): ``model.blocks`` is a non-empty ``ModuleList`` of
timm ``Block``s whose ``attn`` is timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``,
``num_heads``, ``head_dim``); ``model.mask_id`` is the mask token id; ``forward(tokens [B, N],
labels [B])`` returns logits ``[B, N, V]``, tokens in the same order as the blocks' rows.

What changes: the model's class (``VPruneTinyMaskGIT``: plans each step), each block's attention
class (``VPruneAttention``: K/V through the NAT cache), a pre-hook on the first block (gathers the
computed rows) and a hook on the last (scatters them back). ``vprune.unpatch`` removes all of it.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from vprune.config import NATCache, TechniqueConfig
from vprune.errors import IncompatibleModelError, NoTargetsError
from vprune.integrations.registry import Integration
from vprune.undo import vprune_subclass

_ATTN_ATTRS = ("qkv", "q_norm", "k_norm", "proj", "proj_drop", "num_heads", "head_dim")


def _timm_attention_forward(self: Any, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` with K/V through the NAT cache (same ops, so full steps are exact)."""
    rt, layer = self.__dict__["_vprune_nat"]
    if attn_mask is not None or is_causal:
        raise ValueError("a NATCache-patched attention does not take attn_mask/is_causal "
                         "(vprune imposes its own pattern): call vprune.unpatch(model) to train")
    b, n, _ = x.shape
    gate = getattr(self, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = rt.attend(layer, q, k, v, math_scale=None if getattr(self, "fused_attn", True) else self.scale)
    x = x.transpose(1, 2).reshape(b, n, attn_dim)
    norm = getattr(self, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    return self.proj_drop(x)


def _tokens(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["tokens"]


def _labels(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[1] if len(args) > 1 else kwargs["labels"]


class MaskGITIntegration(Integration):
    name = "maskgit-timm"
    techniques = ("nat_cache",)
    tested_on = "vprune testbed TinyMaskGIT; timm 1.0.31"

    def check_structure(self, model: Any) -> None:
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise IncompatibleModelError(f"{type(model).__name__} has no `blocks` to hook")
        if len(blocks) == 0:
            raise NoTargetsError(f"{type(model).__name__}.blocks is empty: NATCache has no block to hook")
        if not isinstance(getattr(model, "mask_id", None), int):
            raise IncompatibleModelError(f"{type(model).__name__} has no int `mask_id` (the mask token id)")
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            missing = [a for a in _ATTN_ATTRS if not hasattr(attn, a)]
            if attn is None or missing:
                raise IncompatibleModelError(
                    f"{type(model).__name__}.blocks[{i}].attn is not a timm Attention "
                    f"(missing {missing or ['attn']})")

    def default_config(self, model: Any, **overrides: Any) -> TechniqueConfig:
        return NATCache(**overrides)

    def apply(self, model: Any, config: TechniqueConfig, state: Any) -> None:
        from vprune import nat

        blocks = list(model.blocks)
        rt = nat.install(model, state, config, blocks=blocks, tag="maskgit",
                         mask_fn=self._mask, cond_fn=self._cond, conf_fn=self._conf)
        for i, blk in enumerate(blocks):
            attn = blk.attn
            state.undo.set_attr(attn, "_vprune_nat", (rt, i))
            state.undo.swap_class(attn, vprune_subclass(type(attn), {"forward": _timm_attention_forward},
                                                        tag="nat-timm"))
            state.targets.append(f"blocks.{i}.attn")

    @staticmethod
    def _mask(model: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        return _tokens(args, kwargs) == model.mask_id

    @staticmethod
    def _cond(model: Any, args: tuple, kwargs: dict) -> Sequence[torch.Tensor]:
        return [_labels(args, kwargs)]

    @staticmethod
    def _conf(model: Any, out: torch.Tensor) -> torch.Tensor:
        return out.float().softmax(-1).amax(-1)

    def reset(self, model: Any, state: Any) -> None:
        state.runtime.reset()

    def stats(self, model: Any, state: Any) -> Dict[str, Any]:
        return state.runtime.summary()
