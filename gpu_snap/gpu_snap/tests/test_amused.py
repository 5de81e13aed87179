"""NATCache on diffusers' aMUSEd (tiny UVit2DModel, random weights, real AmusedPipeline/Scheduler)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import vprune  # noqa: E402
from vprune import nat  # noqa: E402
from vprune.errors import IncompatibleModelError  # noqa: E402
from vprune.integrations.amused import amused_generate  # noqa: E402

STEPS = 8
GRID = 8
B = 2
MASK_ID = 39


pytestmark = pytest.mark.usefixtures("one_thread")  # exact comparisons: one intra-op thread (conftest)


def tiny(res_blocks=0, **kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, cond_embed_dim=16, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
               encoder_hidden_size=16, vocab_size=40, codebook_size=32, in_channels=16, block_out_channels=16,
               num_res_blocks=res_blocks, block_num_heads=2, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=64, sample_size=GRID)
    cfg.update(kw)
    m = diffusers.UVit2DModel(**cfg).eval()
    with torch.no_grad():    # sharpen the random head so that sampling depends on the context
        m.mlm_layer.conv2.weight.mul_(30)
    return m


@pytest.fixture(scope="module")
def pipe():
    vq = diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                           layers_per_block=1, latent_channels=4, num_vq_embeddings=32, vq_embed_dim=4,
                           norm_num_groups=4, sample_size=16)
    return diffusers.AmusedPipeline(vqvae=vq, tokenizer=None, text_encoder=None, transformer=tiny(0),
                                    scheduler=diffusers.AmusedScheduler(mask_token_id=MASK_ID))


def _text(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                negative_prompt_embeds=torch.randn(batch, 16, generator=g),
                negative_encoder_hidden_states=torch.randn(batch, 5, 16, generator=g))


def _pipe_run(pipe, guidance=4.0):
    logits = []
    h = pipe.transformer.register_forward_hook(lambda m, a, o: logits.append(o.detach().clone()))
    try:
        pipe.set_progress_bar_config(disable=True)
        toks = pipe(**_text(), height=16, width=16, num_inference_steps=STEPS, guidance_scale=guidance,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images
    finally:
        h.remove()
    return toks, logits


def _equal(a, b):
    return torch.equal(a[0], b[0]) and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_pipeline_cache_refresh_1_is_vanilla_and_unpatch_restores(pipe):
    m = pipe.transformer
    ref = _pipe_run(pipe)
    procs = [(type(b.attn1.processor), type(b.attn2.processor)) for b in m.transformer_layers]
    vprune.patch(m, vprune.NATCache(mode="cache", refresh=1))
    assert type(m).__name__ == "VPruneUVit2DModel"
    assert _equal(_pipe_run(pipe), ref)
    vprune.unpatch(m)
    assert type(m) is diffusers.UVit2DModel
    assert [(type(b.attn1.processor), type(b.attn2.processor)) for b in m.transformer_layers] == procs
    assert not m.transformer_layers[0]._forward_pre_hooks and not m.transformer_layers[-1]._forward_hooks
    assert _equal(_pipe_run(pipe), ref)


def test_pipeline_disentangle_cache_is_lossless(pipe):
    m = pipe.transformer
    with vprune.patched(m, vprune.NATCache(mode="disentangle", refresh=1)):
        uncached = _pipe_run(pipe)
    with vprune.patched(m, vprune.NATCache(mode="disentangle", refresh=1000)):
        cached = _pipe_run(pipe)
        assert vprune.stats(m)["tokens_computed_fraction"] < 0.9
    assert _equal(cached, uncached)


@pytest.mark.parametrize("mode, refresh", [("cache", 3), ("reuse", 4)])
def test_pipeline_modes_run_and_start_exact(pipe, mode, refresh):
    ref = _pipe_run(pipe)
    with vprune.patched(pipe.transformer, vprune.NATCache(mode=mode, refresh=refresh)):
        out = _pipe_run(pipe)
    assert torch.equal(out[1][0], ref[1][0])          # the first step is a full step
    assert out[0].shape == ref[0].shape and (out[0] < 32).all()


def test_tokens_per_block_and_text_kv_once(pipe):
    m = pipe.transformer
    n = GRID * GRID
    seen, text_kv = [], []
    with vprune.patched(m, vprune.NATCache(mode="cache", refresh=3)):
        hs = [blk.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1])) for blk in m.transformer_layers]
        hs.append(m.transformer_layers[1].attn2.to_k.register_forward_hook(lambda *a: text_kv.append(1)))
        try:
            _pipe_run(pipe)
        finally:
            for h in hs:
                h.remove()
    counts = nat.cosine_mask_counts(n, STEPS)
    exp = []
    for s in range(STEPS):
        if s % 3 == 0:
            exp.append(n)
        else:
            k = -(-counts[s - 1] // nat.SUBSET_MULTIPLE) * nat.SUBSET_MULTIPLE
            exp.append(k if k < n else n)
    layers = len(m.transformer_layers)
    assert seen == [k for k in exp for _ in range(layers)]
    # text K/V are computed on full steps only
    assert len(text_kv) == sum(1 for k in exp if k == n)


def test_two_pass_cfg_keeps_separate_state():
    m = tiny(0)
    sch = diffusers.AmusedScheduler(mask_token_id=MASK_ID)
    t = _text(1, batch=1)
    mc = torch.tensor([[256.0, 256, 0, 0, 6]])

    def run():
        latents = torch.full((1, GRID, GRID), MASK_ID, dtype=torch.long)
        sch.set_timesteps(STEPS, (2, 0))
        g = torch.Generator().manual_seed(3)
        outs = []
        for ts in sch.timesteps:
            con = m(latents, micro_conds=mc, pooled_text_emb=t["prompt_embeds"],
                    encoder_hidden_states=t["encoder_hidden_states"])
            unc = m(latents, micro_conds=mc, pooled_text_emb=t["negative_prompt_embeds"],
                    encoder_hidden_states=t["negative_encoder_hidden_states"])
            out = unc + 3.0 * (con - unc)
            outs.append(out)
            latents = sch.step(out, ts, latents, generator=g).prev_sample
        return latents, outs

    with torch.no_grad():
        with vprune.patched(m, vprune.NATCache(mode="disentangle", refresh=1)):
            ref = run()
        with vprune.patched(m, vprune.NATCache(mode="disentangle", refresh=1000)):
            out = run()
            assert len(m._vprune.runtime.streams) == 2
    assert _equal(out, ref)


def test_loop_helper_matches_pipeline(pipe):
    t = _text()
    ehs = torch.cat([t["negative_encoder_hidden_states"], t["encoder_hidden_states"]])
    pooled = torch.cat([t["negative_prompt_embeds"], t["prompt_embeds"]])
    mc = torch.tensor([[16.0, 16, 0, 0, 6]]).expand(2 * B, 5)
    toks = amused_generate(pipe.transformer, pipe.scheduler, ehs, pooled, mc, batch=B, grid=GRID, steps=STEPS,
                           guidance=4.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(toks, _pipe_run(pipe)[0])


def test_structure_errors_leave_model_unchanged():
    m = tiny(0, downsample=True)
    with pytest.raises(IncompatibleModelError, match="downsample"):
        vprune.patch(m, vprune.NATCache())
    assert type(m) is diffusers.UVit2DModel
    from diffusers.models.attention_processor import AttnProcessor
    m = tiny(0)
    m.set_attn_processor(AttnProcessor())
    with pytest.raises(IncompatibleModelError, match="AttnProcessor2_0"):
        vprune.patch(m, vprune.NATCache())
    assert type(m) is diffusers.UVit2DModel and not vprune.is_patched(m)


def test_res_blocks_disentangle_is_reported_as_approximate():
    m = tiny(1)
    with vprune.patched(m, vprune.NATCache(mode="disentangle")):
        assert any("approximate" in s for s in vprune.stats(m)["skipped"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_bench_without_cuda_says_so(capsys):
    from vprune.cli import main
    assert main(["bench", "nat", "--json", ""]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
