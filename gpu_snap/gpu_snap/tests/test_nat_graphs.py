"""CUDA-graph bookkeeping of NATRuntime.call, checked on CPU with a stand-in backend.

The stand-in "captures" by running the body once with every stream buffer restored afterwards (a
real capture has no device side effects) and "replays" by running the captured body again on the
static inputs with the host plan it was captured with, writing into the captured output. Graph mode
must then give exactly the eager results, over several generations (the later ones replay only).
A real-GPU test runs when CUDA is available.
"""
import pytest
import torch

import vprune
from vprune import nat
from vprune.testbed import maskgit as mg


class FakeGraphBackend(nat.CudaGraphBackend):
    def __init__(self):
        super().__init__()
        self.captures = 0
        self.replays = 0

    def usable(self):
        return True

    def on_device(self, t):
        return True

    @staticmethod
    def _buffers(rt):
        out = []
        for s in rt.streams:
            out += [s.prev_mask, s.revkey, s.conf]
            for k, v in s.kv.values():
                out += [k, v]
            for v in s.extra.values():
                out += [t for t in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(t, torch.Tensor)]
            if s.out is not None:
                out.append(s.out)
        return out

    def capture(self, body, runtime):
        bufs = self._buffers(runtime)
        snap = [b.clone() for b in bufs]
        out = body()
        for b, c in zip(bufs, snap):
            b.copy_(c)
        self.captures += 1
        return (body, out), out

    def replay(self, graph):
        body, out = graph
        out.copy_(body())
        self.replays += 1


@pytest.fixture(scope="module")
def model():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = mg.TinyMaskGIT(mg.MaskGITConfig(dim=32, depth=2, heads=2)).eval()
    with torch.no_grad():
        m.head.weight.mul_(20)
    yield m
    torch.set_num_threads(old)


LABELS = torch.tensor([1, 4])


def _gens(model, n=3, cfg="batch"):
    res = []
    for seed in range(n):
        logits = []
        h = model.register_forward_hook(lambda mod, a, o: logits.append(o.detach().clone()))
        try:
            res.append((mg.sample(model, LABELS, steps=8, guidance=2.0, seed=seed, cfg=cfg), logits))
        finally:
            h.remove()
    return res


@pytest.mark.parametrize("mode, refresh, cfg", [("disentangle", 100, "batch"), ("cache", 3, "batch"),
                                                ("reuse", 3, "batch"), ("cache", 3, "two_pass")])
def test_graph_mode_equals_eager(model, mode, refresh, cfg):
    with vprune.patched(model, vprune.NATCache(mode=mode, refresh=refresh)):
        eager = _gens(model, cfg=cfg)
    with vprune.patched(model, vprune.NATCache(mode=mode, refresh=refresh, cuda_graphs=True)):
        backend = FakeGraphBackend()
        model._vprune.runtime.graph_backend = backend
        graphs = _gens(model, cfg=cfg)
        n_graphs = vprune.stats(model)["graphs_captured"]
    assert backend.captures == n_graphs > 0
    assert backend.replays > 0
    for (te, le), (tg, lg) in zip(eager, graphs):
        assert torch.equal(te, tg)
        assert all(torch.equal(a, b) for a, b in zip(le, lg))


def test_graphs_off_under_autograd(model):
    with vprune.patched(model, vprune.NATCache(mode="cache", refresh=2, cuda_graphs=True)):
        backend = FakeGraphBackend()
        model._vprune.runtime.graph_backend = backend
        x = torch.full((1, mg.N_TOKENS), model.mask_id)
        model(x, LABELS[:1])                       # grad enabled: eager
        assert backend.captures == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_equal_eager():
    torch.manual_seed(0)
    m = mg.TinyMaskGIT(mg.MaskGITConfig(dim=64, depth=2, heads=2)).cuda().eval()
    lab = LABELS.cuda()
    for mode, r in (("disentangle", 100), ("cache", 3), ("reuse", 3)):
        with torch.no_grad():
            with vprune.patched(m, vprune.NATCache(mode=mode, refresh=r)):
                ref = [mg.sample(m, lab, steps=8, seed=s) for s in range(3)]
            with vprune.patched(m, vprune.NATCache(mode=mode, refresh=r, cuda_graphs=True)):
                out = [mg.sample(m, lab, steps=8, seed=s) for s in range(3)]
                assert vprune.stats(m)["graphs_captured"] > 0
        for a, b in zip(ref, out):
            assert (a == b).float().mean() > 0.95, mode     # GPU kernels may differ in the last bit


@pytest.mark.parametrize("mode, refresh", [("cache", 3), ("reuse", 4)])
def test_graph_mode_equals_eager_amused(mode, refresh):
    diffusers = pytest.importorskip("diffusers")
    from vprune.integrations.amused import amused_generate

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        m = diffusers.UVit2DModel(hidden_size=32, cond_embed_dim=16, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
                                  encoder_hidden_size=16, vocab_size=40, codebook_size=32, in_channels=16,
                                  block_out_channels=16, num_res_blocks=1, block_num_heads=2, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, sample_size=8).eval()
        with torch.no_grad():
            m.mlm_layer.conv2.weight.mul_(30)
        sch = diffusers.AmusedScheduler(mask_token_id=39)
        g = torch.Generator().manual_seed(0)
        ehs, pooled = torch.randn(4, 5, 16, generator=g), torch.randn(4, 16, generator=g)
        mc = torch.tensor([[64.0, 64, 0, 0, 6]]).expand(4, 5)

        def gens():     # tokens of 3 generations, and every call's logits
            logits = []
            h = m.register_forward_hook(lambda mod, a, o: logits.append(o.detach().clone()))
            try:
                toks = [amused_generate(m, sch, ehs, pooled, mc, batch=2, grid=8, steps=8, guidance=3.0,
                                        generator=torch.Generator().manual_seed(s)) for s in range(3)]
            finally:
                h.remove()
            return toks, logits

        with torch.no_grad():
            with vprune.patched(m, vprune.NATCache(mode=mode, refresh=refresh)):
                eager = gens()
            with vprune.patched(m, vprune.NATCache(mode=mode, refresh=refresh, cuda_graphs=True)):
                backend = FakeGraphBackend()
                m._vprune.runtime.graph_backend = backend
                graphs = gens()
                kinds = [h["kind"] for h in m._vprune.runtime.history]
        assert backend.replays > 0 and "subset" in kinds
        assert all(torch.equal(a, b) for a, b in zip(eager[0], graphs[0]))
        assert len(eager[1]) == len(graphs[1]) == 24
        assert all(torch.equal(a, b) for a, b in zip(eager[1], graphs[1]))
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_equal_eager_amused():
    diffusers = pytest.importorskip("diffusers")
    from vprune.integrations.amused import amused_generate

    torch.manual_seed(0)
    m = diffusers.UVit2DModel(hidden_size=64, cond_embed_dim=16, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
                              encoder_hidden_size=16, vocab_size=40, codebook_size=32, in_channels=16,
                              block_out_channels=32, num_res_blocks=2, block_num_heads=2, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64, sample_size=16).cuda().eval()
    sch = diffusers.AmusedScheduler(mask_token_id=39)
    g = torch.Generator().manual_seed(0)
    ehs, pooled = torch.randn(4, 5, 16, generator=g).cuda(), torch.randn(4, 16, generator=g).cuda()
    mc = torch.tensor([[256.0, 256, 0, 0, 6]]).expand(4, 5).cuda()

    def gens():
        return [amused_generate(m, sch, ehs, pooled, mc, batch=2, grid=16, steps=12, guidance=3.0,
                                generator=torch.Generator("cuda").manual_seed(s)) for s in range(3)]

    for mode, r in (("cache", 4), ("reuse", 4)):
        with torch.no_grad():
            with vprune.patched(m, vprune.NATCache(mode=mode, refresh=r)):
                ref = gens()
            with vprune.patched(m, vprune.NATCache(mode=mode, refresh=r, cuda_graphs=True)):
                out = gens()
                assert vprune.stats(m)["graphs_captured"] > 0
        for a, b in zip(ref, out):
            assert (a == b).float().mean() > 0.95, mode     # GPU kernels may differ in the last bit
