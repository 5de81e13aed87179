"""Diagnostic: the CUDA route with padding forced unknown (non-dense) and the default route, each
against the reference path (_FAST_PATHS/_BATCHED_DECODE/_HANDED_QUERIES/_HOST_SELECT off)."""
import sys
import numpy as np
import torch
sys.path.insert(0, "tests")
import test_openvla as TO
import vprune
from vprune.integrations import openvla

FLAGS = ("_FAST_PATHS", "_BATCHED_DECODE", "_HANDED_QUERIES", "_HOST_SELECT")
ORIG_PF = openvla._padding_free


def run(batch, with_mask):
    with torch.no_grad():
        model = TO._testbed(seed=8).cuda()
    vprune.patch(model, vprune.VisualPruning(keep=0.25, warmup=1, action_layer=3))
    rec = []
    try:
        for step in range(4):
            ids, pix = TO.T.inputs(seed=40 + step, batch=batch)
            kw = {"attention_mask": torch.ones_like(ids).cuda()} if with_mask else {}
            act = np.asarray(model.predict_action(ids.cuda(), pixel_values=pix.cuda(), **kw))
            rt = TO._runtime(model)
            hist = rt.history.scores
            rec.append(([s["kept_indices"] for s in vprune.stats(model)["per_sample"]], act.tolist(),
                        None if hist is None else hist.cpu(), rt.dense))
    finally:
        vprune.unpatch(model)
    return rec


for forced in (True, False):
    for with_mask in (True, False):
        for batch in (1, 2):
            openvla._padding_free = (lambda *a: False) if forced else ORIG_PF
            got = run(batch, with_mask)
            for f in FLAGS:
                setattr(openvla, f, False)
            want = run(batch, with_mask)
            for f in FLAGS:
                setattr(openvla, f, True)
            for step, (a, b) in enumerate(zip(got, want)):
                print("forced-nondense" if forced else "default", "mask" if with_mask else "nomask", batch, step,
                      "dense", a[3], "keep", a[0] == b[0], "act", a[1] == b[1],
                      None if a[2] is None else float((a[2] - b[2]).abs().max()))
