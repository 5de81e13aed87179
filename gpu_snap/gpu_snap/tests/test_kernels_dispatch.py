"""Dispatch: VPRUNE_KERNELS routing, torch-only fallback, the torch.library custom ops (fake tensors,
autograd, torch.compile(fullgraph=True)).

Cases that must run the Triton code path on the CPU run in a child process started with
TRITON_INTERPRET=1 (this file with --worker); the torch-only fallback runs in a child where
``import triton`` fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict

import pytest
import torch

import vprune.kernels as K
from vprune.kernels import dispatch as D


def _run_child(args, env_extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- routing (this process) ---------------------------------------------------------------

def test_routing_defaults_and_forcing(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1, 4)
    monkeypatch.delenv("VPRUNE_KERNELS", raising=False)
    assert D.backend_for(cpu) == "torch"  # CPU tensors default to the reference
    monkeypatch.setenv("VPRUNE_KERNELS", "TORCH ")
    assert D.backend_for(cpu) == "torch"
    monkeypatch.setenv("VPRUNE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VPRUNE_KERNELS"):
        D.backend_for(cpu)


@pytest.mark.skipif(D.INTERPRET, reason="this process runs with TRITON_INTERPRET=1")
def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPRUNE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|not importable"):
        K.select_topk(torch.randn(2, 8), 3)


def test_without_triton_everything_falls_back() -> None:
    code = (
        "import sys, json; sys.modules['triton'] = None\n"
        "import os, torch, vprune.kernels as K\n"
        "from vprune.kernels import dispatch as D, select as S\n"
        "s = torch.randn(3, 50); r = {'has_triton': D.HAS_TRITON}\n"
        "r['select'] = bool(torch.equal(K.select_topk(s, 7), S.select_topk_reference(s, 7)))\n"
        "r['gather'] = list(K.gather_rows(torch.randn(3, 50, 4), K.select_topk(s, 7)).shape)\n"
        "os.environ['VPRUNE_KERNELS'] = 'triton'\n"
        "try:\n    K.select_topk(s, 7); r['forced'] = 'no error'\n"
        "except RuntimeError as e:\n    r['forced'] = str(e)\n"
        "print(json.dumps(r))\n"
    )
    r = _run_child(["-c", code], {"VPRUNE_KERNELS": ""})
    assert r["has_triton"] is False
    assert r["select"] is True and r["gather"] == [3, 7, 4]
    assert "not importable" in r["forced"]


# ---- custom ops on the reference path (this process) ---------------------------------------

needs_ops = pytest.mark.skipif(not D.OPS_REGISTERED, reason="torch.library.custom_op needs torch >= 2.4")


@needs_ops
def test_ops_registered_and_pass_opcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPRUNE_KERNELS", "torch")
    s = torch.randn(2, 40)
    x = torch.randn(2, 40, 6, requires_grad=True)
    idx = K.select_topk(s, 9)
    quick = ("test_schema", "test_faketensor")  # the aot_dispatch check costs seconds: run it once
    torch.library.opcheck(torch.ops.vprune.select_topk.default, (s, 9), test_utils=quick)
    torch.library.opcheck(torch.ops.vprune.select_topk_per_row.default, (s, torch.tensor([3, 9]), 9), test_utils=quick)
    torch.library.opcheck(torch.ops.vprune.gather_rows.default, (torch.randn(2, 3, 40, 4), idx, 2), test_utils=quick)
    torch.library.opcheck(torch.ops.vprune.gather_rows.default, (x, idx, 1))  # incl. autograd registration


@needs_ops
def test_gather_autograd_matches_indexing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPRUNE_KERNELS", "torch")
    x = torch.randn(2, 3, 20, 4, requires_grad=True)
    idx = torch.tensor([[1, 5, 5, 19], [0, 2, 3, 4]])
    w = torch.randn(2, 3, 4, 4)
    (K.gather_rows(x, idx, 2) * w).sum().backward()
    g_ref = torch.zeros_like(x)
    for b in range(2):
        for j, t in enumerate(idx[b].tolist()):
            g_ref[b, :, t] += w[b, :, j]
    assert torch.allclose(x.grad, g_ref)


def _pruned_block(s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """What an integration does: select, gather hidden states and a K/V-shaped tensor, keep computing."""
    idx = K.select_topk(s, 5)
    kv = h.unsqueeze(1).expand(-1, 2, -1, -1)
    return K.gather_rows(h, idx, 1).sum(-1) + K.gather_rows(kv, idx, 2).sum((1, -1)) + idx


@needs_ops
def test_torch_compile_fullgraph_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPRUNE_KERNELS", "torch")
    torch._dynamo.reset()
    s, h = torch.randn(3, 30), torch.randn(3, 30, 8)
    compiled = torch.compile(_pruned_block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(s, h), _pruned_block(s, h))


# ---- the Triton path through the public API (child process, interpreter) -----------------------

def _worker() -> Dict[str, str]:
    from vprune.kernels import gather as G, select as S

    r: Dict[str, str] = {"backend": D.backend_for(torch.zeros(1))}
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 77, generator=g).to(torch.bfloat16)
    h = torch.randn(3, 77, 8, generator=g)
    r["select"] = str(torch.equal(K.select_topk(s, 20), S.select_topk_reference(s, 20)))
    idx = K.select_topk(s, 20)
    r["gather"] = str(torch.equal(K.gather_rows(h, idx), G.gather_rows_reference(h, idx)))
    kk = torch.tensor([0, 7, 20])
    r["per_row"] = str(torch.equal(K.select_topk_per_row(s, kk, 20), S.select_topk_per_row_reference(s, kk, 20)))
    # autograd through the op (Triton forward, torch backward)
    x = h.clone().requires_grad_(True)
    K.gather_rows(x, idx).pow(2).sum().backward()
    x2 = h.clone().requires_grad_(True)
    G.gather_rows_reference(x2, idx).pow(2).sum().backward()
    r["grad"] = str(torch.allclose(x.grad, x2.grad))
    if D.OPS_REGISTERED:
        compiled = torch.compile(_pruned_block, fullgraph=True, backend="aot_eager")
        r["compile"] = str(torch.equal(compiled(s, h), _pruned_block(s, h)))
    else:
        r["compile"] = "True"
    return r


@pytest.fixture(scope="module")
def interp_report() -> Dict[str, str]:
    return _run_child([os.path.abspath(__file__), "--worker"], {"TRITON_INTERPRET": "1", "VPRUNE_KERNELS": "triton"})


def test_interpreter_child_uses_triton(interp_report: Dict[str, str]) -> None:
    assert interp_report["backend"] == "triton"


@pytest.mark.parametrize("what", ["select", "gather", "per_row", "grad", "compile"])
def test_triton_path_public_api(interp_report: Dict[str, str], what: str) -> None:
    assert interp_report[what] == "True", interp_report


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
