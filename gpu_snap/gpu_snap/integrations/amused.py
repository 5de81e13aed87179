"""NATCache for diffusers' aMUSEd transformer (``UVit2DModel`` inside ``AmusedPipeline``).

Tested on: diffusers 0.42.1 (``AmusedPipeline`` lives under ``pipelines/deprecated`` there),
torch 2.14; aMUSEd-256-shaped ``UVit2DModel`` (22 ``BasicTransformerBlock``s, width 1024, 16x16
tokens) with random weights and tiny configs. Install with ``pip install vprune[diffusers]``; vprune
itself imports without diffusers (the registry matches the class name ``UVit2DModel``).

What is patched (all undone by ``vprune.unpatch``):

* the model's class -> ``VPruneUVit2DModel``, whose ``forward`` plans each sampling step from
  ``input_ids`` (mask = any id >= ``codebook_size``, which covers aMUSEd's mask id 8255) and a
  fingerprint of the text conditioning, then runs the unchanged ``UVit2DModel.forward`` (or a
  captured CUDA graph of it);
* every ``transformer_layers[i].attn1.processor`` (self-attention) -> a processor that sends K/V
  through the NAT cache, with the same ops as ``AttnProcessor2_0`` (full steps are bit-identical);
* every ``transformer_layers[i].attn2.processor`` (cross-attention to the text) -> a processor that
  computes the text K/V once per generation (full steps) and reuses them on the other steps.

Modes "cache" and "reuse" run the whole forward on the ``k`` rows computed this step (cheap steps;
full steps run everything as before, bit-identical, and record the caches below):

* the forward gets ``input_ids`` cut to those rows as a ``[B, k, 1]`` "image", so the embedding,
  the ConvNeXt pointwise MLPs, the down/up block attentions, the projections, the 22 layers and the
  MLM head all compute ``k`` rows; its logits ``[B, V, k, 1]`` are written into the logits of the
  last full step (cached per stream), and the caller gets ``[B, V, H, W]``. The other rows' logits
  are stale; ``AmusedScheduler.step`` samples every token but keeps (and ranks by confidence) only
  the still-masked ones, all of which mode cache computes (reuse computes the likeliest next ones);
* each ConvNeXt ``depthwise`` conv: a pre-hook writes the rows into a cached full input map
  ``[B, C, H, W]`` (the other tokens as last computed) and convolves that; a hook passes on only the
  computed rows;
* each ConvNeXt ``channelwise_norm`` (``GlobalResponseNorm``): its ``forward`` is set on the
  instance to :class:`RowGRN`, whose per-channel L2 norm over all tokens is taken over a cached
  input map with this step's rows written in (the other tokens as last computed);
* the down/up ``attention_blocks``' ``attn1``/``attn2`` (both cross-attend to the text: no token
  mixing) get the text-K/V-once processor too.

Mode "disentangle" shortens only the 22 layers: a pre-hook on ``transformer_layers[0]`` gathers
the computed rows, a hook on ``transformer_layers[-1]`` scatters them back over the cached output
of the stack; the down/up blocks and the head run on all tokens. The pipeline's ``__call__`` is
untouched: CFG runs as one concatenated [uncond; cond] batch, i.e. per-row state of one stream.

Limitations: ``downsample``/``upsample`` variants (aMUSEd-512) are refused (stack tokens would not
match ``input_ids`` one to one); only the default ``AttnProcessor2_0`` is supported (others: clear
error); modes cache/reuse keep, per stream, each ConvNeXt block's GRN input rows ``[B, N, 4C]`` and
depthwise input map plus the logits ``[B, V, H, W]`` (aMUSEd-256, B=32 fp16: ~0.5 GB besides the
stack's K/V); mode "disentangle" is exact (cached == uncached) only with ``num_res_blocks=0``,
because the down-block's depthwise convolution and GRN statistic mix tokens into the stack's input.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vprune.config import NATCache, TechniqueConfig
from vprune.errors import IncompatibleModelError, NoTargetsError
from vprune.integrations.registry import Integration

_SUPPORTED_PROCESSORS = ("AttnProcessor2_0",)


class NATSelfAttnProcessor:
    """``AttnProcessor2_0`` for a stack self-attention, K/V through the NAT cache."""

    def __init__(self, runtime: Any, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("NATCache self-attention expects [B, N, C] hidden states without "
                             "encoder_hidden_states/attention_mask")
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = self.runtime.attend(self.layer, query, key, value)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out / attn.rescale_output_factor


class NATCrossAttnProcessor:
    """``AttnProcessor2_0`` for a cross-attention to the text, text K/V computed once per generation
    (on full steps) under ``key``; the queries are whatever rows the step computes."""

    def __init__(self, runtime: Any, key: Any, original: Any) -> None:
        self.runtime = runtime
        self.key = key
        self.original = original

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None or encoder_hidden_states is None or hidden_states.ndim != 3:
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, temb=temb, *args, **kwargs)
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states)

        def text_kv() -> tuple:
            ehs = encoder_hidden_states
            if attn.norm_cross:
                ehs = attn.norm_encoder_hidden_states(ehs)
            key = attn.to_k(ehs)
            value = attn.to_v(ehs)
            hd = key.shape[-1] // attn.heads
            key = key.view(b, -1, attn.heads, hd).transpose(1, 2)
            value = value.view(b, -1, attn.heads, hd).transpose(1, 2)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            return key, value

        key, value = self.runtime.cached(("text_kv", self.key), text_kv)
        head_dim = key.shape[-1]
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out / attn.rescale_output_factor


def _input_ids(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input_ids"]


def _kw(args: tuple, kwargs: dict, name: str, pos: int) -> Any:
    return kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else None)


# ----------------------------------------------------------------------------- whole forward on rows

class RowGRN:
    """``GlobalResponseNorm.forward`` (set on the instance) whose per-channel L2 statistic covers
    all ``N`` tokens on subset steps: the computed rows fresh, the others as last computed (the
    same ``torch.norm`` reduction as the module's, over the cached rows with this step's written in).

    Input ``[B, n, w, C]`` channels last (``n * w`` tokens). Full steps run the module's own forward
    (bit-identical) and record the rows.
    """

    def __init__(self, runtime: Any, module: Any, key: Any) -> None:
        self.runtime = runtime
        self.module = module
        self.key = key

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rt, m = self.runtime, self.module
        if not rt.active:
            return type(m).forward(m, x)
        gx = rt.token_norm(self.key, x.reshape(x.shape[0], -1, x.shape[-1]))     # [B, C], x's dtype
        if gx is None:                                                           # full step
            return type(m).forward(m, x)
        gx = gx[:, None, None, :]
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return m.gamma * (x * nx) + m.beta + x


def _hook_depthwise(state: Any, rt: Any, conv: Any, key: Any) -> None:
    """Subset steps: the depthwise conv reads the full cached map with this step's rows written in
    (``[B, C, k, 1]`` -> ``[B, C, H, W]``) and passes on only the computed rows (-> ``[B, C, k, 1]``)."""

    def pre(module: Any, args: tuple) -> Optional[tuple]:
        return (rt.full_map(key, args[0]),) + tuple(args[1:]) if rt.active else None

    def post(module: Any, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
        return rt.rows_of(out)[..., None] if rt.active and rt.dev.idx is not None else None

    state.undo.add_hook(conv.register_forward_pre_hook(pre))
    state.undo.add_hook(conv.register_forward_hook(post))


def _gather_ids(model: Any, rt: Any, args: tuple, kwargs: dict) -> tuple:
    """``input_ids`` ``[B, H, W]`` -> the computed rows as a ``[B, k, 1]`` "image": every module of
    ``UVit2DModel.forward`` then runs on ``k`` tokens."""
    ids = _input_ids(args, kwargs)
    rows = rt.take(ids.reshape(ids.shape[0], -1))[:, :, None]
    if args:
        return (rows,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, input_ids=rows)


def _merge_logits(model: Any, rt: Any, logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, V, k, 1]`` of the computed rows -> ``[B, V, H, W]`` over the cached logits."""
    return rt.merge_rows("logits", logits)


def _uvit_blocks(model: Any) -> List[Tuple[str, Any]]:
    return [("down_block", model.down_block), ("up_block", model.up_block)]


def _check_attention(attn: Any, where: str) -> None:
    if attn is None:
        raise IncompatibleModelError(f"{where} is missing")
    proc = type(getattr(attn, "processor", None)).__name__
    if proc not in _SUPPORTED_PROCESSORS:
        raise IncompatibleModelError(
            f"{where} uses attention processor {proc}: NATCache supports {list(_SUPPORTED_PROCESSORS)} "
            "(call model.set_attn_processor(AttnProcessor2_0()) first)")
    bad = [a for a in ("spatial_norm", "group_norm") if getattr(attn, a, None) is not None]
    if getattr(attn, "residual_connection", False):
        bad.append("residual_connection")
    if bad:
        raise IncompatibleModelError(f"{where} uses unsupported {bad}")


class AmusedIntegration(Integration):
    name = "amused"
    techniques = ("nat_cache",)
    tested_on = "diffusers 0.42.1 (UVit2DModel, AmusedPipeline, AmusedScheduler)"

    def check_structure(self, model: Any) -> None:
        cfg = getattr(model, "config", None)
        layers = getattr(model, "transformer_layers", None)
        if cfg is None or layers is None:
            raise IncompatibleModelError(
                f"{type(model).__name__} has no `config` or no `transformer_layers`: "
                "not a diffusers UVit2DModel this integration knows")
        if len(layers) == 0:
            raise NoTargetsError("UVit2DModel.transformer_layers is empty (num_hidden_layers=0): nothing to hook")
        if getattr(cfg, "downsample", False) or getattr(cfg, "upsample", False):
            raise IncompatibleModelError(
                f"UVit2DModel with downsample={cfg.downsample}, upsample={cfg.upsample} is not supported: "
                "NATCache needs stack tokens that match input_ids one to one (aMUSEd-256 layout)")
        if not isinstance(getattr(cfg, "codebook_size", None), int):
            raise IncompatibleModelError("UVit2DModel.config has no int codebook_size")
        for i, blk in enumerate(layers):
            for name in ("attn1", "attn2"):
                _check_attention(getattr(blk, name, None), f"transformer_layers[{i}].{name}")
            if getattr(blk, "only_cross_attention", False) or getattr(blk, "pos_embed", None) is not None:
                raise IncompatibleModelError(
                    f"transformer_layers[{i}] uses only_cross_attention/pos_embed, which NATCache does not support")

    @staticmethod
    def _check_blocks(model: Any) -> None:
        """What modes cache/reuse need to run the down/up blocks on the computed rows."""
        for where, ub in _uvit_blocks(model):
            res, att = getattr(ub, "res_blocks", None), getattr(ub, "attention_blocks", None)
            if res is None or att is None:
                raise IncompatibleModelError(f"{where} has no res_blocks/attention_blocks (not a diffusers UVitBlock)")
            for j, rb in enumerate(res):
                conv, grn = getattr(rb, "depthwise", None), getattr(rb, "channelwise_norm", None)
                if not isinstance(conv, torch.nn.Conv2d) or conv.stride != (1, 1) or \
                        any(k != 2 * p + 1 for k, p in zip(conv.kernel_size, conv.padding)):
                    raise IncompatibleModelError(
                        f"{where}.res_blocks[{j}].depthwise is not a shape-preserving stride-1 Conv2d")
                if not all(hasattr(grn, a) for a in ("gamma", "beta")):
                    raise IncompatibleModelError(
                        f"{where}.res_blocks[{j}].channelwise_norm is not a GlobalResponseNorm (gamma/beta)")
            for j, ab in enumerate(att):
                for name in ("attn1", "attn2"):
                    _check_attention(getattr(ab, name, None), f"{where}.attention_blocks[{j}].{name}")

    def default_config(self, model: Any, **overrides: Any) -> TechniqueConfig:
        return NATCache(**overrides)

    def apply(self, model: Any, config: TechniqueConfig, state: Any) -> None:
        from vprune import nat

        rows = config.mode != "disentangle"
        if rows:
            self._check_blocks(model)
        layers = list(model.transformer_layers)
        rt = nat.install(model, state, config, blocks=layers, tag="amused",
                         mask_fn=self._mask, cond_fn=self._cond, conf_fn=self._conf,
                         io=nat.TokenIO(gather=_gather_ids, merge=_merge_logits) if rows else None)
        for i, blk in enumerate(layers):
            state.undo.set_attr(blk.attn1, "processor", NATSelfAttnProcessor(rt, i))
            state.undo.set_attr(blk.attn2, "processor", NATCrossAttnProcessor(rt, i, blk.attn2.processor))
            state.targets.append(f"transformer_layers.{i}.attn1")
        if rows:
            state.targets.append("embed")
            for where, ub in _uvit_blocks(model):
                for j, rb in enumerate(ub.res_blocks):
                    _hook_depthwise(state, rt, rb.depthwise, (where, j, "depthwise"))
                    state.undo.set_attr(rb.channelwise_norm, "forward",
                                        RowGRN(rt, rb.channelwise_norm, (where, j, "grn")))
                    state.targets.append(f"{where}.res_blocks.{j}")
                for j, ab in enumerate(ub.attention_blocks):
                    for name in ("attn1", "attn2"):
                        attn = getattr(ab, name)
                        state.undo.set_attr(attn, "processor",
                                            NATCrossAttnProcessor(rt, (where, j, name), attn.processor))
                    state.targets.append(f"{where}.attention_blocks.{j}")
            state.targets.append("mlm_layer")
        elif getattr(model.config, "num_res_blocks", 0) > 0:
            state.skipped.append(
                "disentangle is approximate here: the down-block (num_res_blocks="
                f"{model.config.num_res_blocks}) mixes neighbouring tokens into the stack input")

    @staticmethod
    def _mask(model: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        ids = _input_ids(args, kwargs)
        return (ids >= model.config.codebook_size).reshape(ids.shape[0], -1)

    @staticmethod
    def _cond(model: Any, args: tuple, kwargs: dict) -> Sequence[torch.Tensor]:
        return [_kw(args, kwargs, "encoder_hidden_states", 1), _kw(args, kwargs, "pooled_text_emb", 2),
                _kw(args, kwargs, "micro_conds", 3)]

    @staticmethod
    def _conf(model: Any, logits: torch.Tensor) -> torch.Tensor:
        # max softmax probability as exp(max - logsumexp): two reductions, no [B, V, H, W] float copy
        b = logits.shape[0]
        conf = (logits.amax(1).float() - torch.logsumexp(logits, dim=1).float()).exp()
        return conf.reshape(b, -1)

    def reset(self, model: Any, state: Any) -> None:
        state.runtime.reset()

    def stats(self, model: Any, state: Any) -> Dict[str, Any]:
        return state.runtime.summary()


# ----------------------------------------------------------------------------- sampling loop

@torch.no_grad()
def amused_generate(transformer: Any, scheduler: Any, encoder_hidden_states: torch.Tensor,
                    pooled_text_emb: torch.Tensor, micro_conds: torch.Tensor, *, batch: int, grid: int,
                    steps: int = 12, guidance: float = 10.0, generator: Optional[torch.Generator] = None,
                    temperature: Any = (2, 0)) -> torch.Tensor:
    """``AmusedPipeline``'s denoising loop without text encoder and VQ decoder (tests, benchmarks).

    encoder_hidden_states ``[B', T, E]``, pooled_text_emb ``[B', P]``, micro_conds ``[B', 5]`` with
    ``B' = 2 * batch`` ([uncond; cond]) when ``guidance > 1`` else ``batch``. Returns token ids
    ``[batch, grid, grid]``.
    """
    device = encoder_hidden_states.device
    latents = torch.full((batch, grid, grid), scheduler.config.mask_token_id, dtype=torch.long, device=device)
    scheduler.set_timesteps(steps, temperature, device)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guidance > 1.0 else latents
        out = transformer(model_input, micro_conds=micro_conds, pooled_text_emb=pooled_text_emb,
                          encoder_hidden_states=encoder_hidden_states)
        if guidance > 1.0:
            unc, con = out.chunk(2)
            out = unc + guidance * (con - unc)
        latents = scheduler.step(model_output=out, timestep=t, sample=latents, generator=generator).prev_sample
    return latents


def amused_256_config() -> Dict[str, Any]:
    """UVit2DModel config of the released aMUSEd-256 transformer (shapes only; no weights)."""
    return dict(hidden_size=1024, use_bias=False, hidden_dropout=0.0, cond_embed_dim=768,
                micro_cond_encode_dim=256, micro_cond_embed_dim=1280, encoder_hidden_size=768,
                vocab_size=8256, codebook_size=8192, in_channels=768, block_out_channels=768,
                num_res_blocks=3, downsample=False, upsample=False, block_num_heads=12,
                num_hidden_layers=22, num_attention_heads=16, attention_dropout=0.0,
                intermediate_size=2816, layer_norm_eps=1e-6, ln_elementwise_affine=True, sample_size=16)
