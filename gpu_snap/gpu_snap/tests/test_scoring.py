"""Attention-row scores against a plain full-attention reference."""
import math

import pytest
import torch

from vprune.scoring import attention_row_scores, attention_rows, cosine_distance, repeat_kv_heads


def _full_attention(q, k, mask):
    """Plain reference: the full softmax attention matrix of all rows, in float64."""
    k = repeat_kv_heads(k, q.shape[1]).double()
    logits = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_last_row_scores_match_full_attention(heads, kv_heads):
    torch.manual_seed(heads * 10 + kv_heads)
    b, n, dh = 3, 11, 8
    q = torch.randn(b, heads, n, dh)
    k = torch.randn(b, kv_heads, n, dh)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[1, :3] = False  # left padding on one row
    mask = causal[None, None] & pad[:, None, None, :]
    ref = _full_attention(q, k, mask)[:, :, -1, :].mean(dim=1)
    got = attention_row_scores(q[:, :, -1:], k, mask[:, :, -1:])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(got[1, :3] == 0)


def test_row_weights_average_only_weighted_rows():
    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 7, 4)
    w = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.float32)
    probs = attention_rows(q, k).mean(dim=1)
    ref = torch.stack([probs[0, [0, 1, 4]].mean(0), probs[1, 3]])
    torch.testing.assert_close(attention_row_scores(q, k, row_weights=w), ref)


def test_additive_mask_equals_bool_mask_and_fully_masked_rows_are_zero():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 5, 4)
    keep = torch.tensor([[[[True, False, True, True, False], [False] * 5]]])
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    a, b = attention_rows(q, k, keep), attention_rows(q, k, additive)
    torch.testing.assert_close(a, b)
    assert torch.all(a[:, :, 1] == 0) and not torch.isnan(a).any()


def test_bad_shapes_and_gqa_mismatch():
    with pytest.raises(ValueError, match="4-D"):
        attention_rows(torch.randn(2, 3, 4), torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match="multiple"):
        repeat_kv_heads(torch.randn(1, 3, 4, 2), 4)


def test_cosine_distance():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])
    torch.testing.assert_close(cosine_distance(x), torch.tensor([[[0.0, 1, 2], [1, 0, 1], [2, 1, 0]]]))


def test_cosine_distance_is_one_minus_the_normalised_gram():
    """cosine_distance / cosine_gram use F.normalize's ops without its wrappers: the same bits."""
    from vprune.scoring import cosine_gram

    torch.manual_seed(3)
    x = torch.randn(2, 17, 9)
    x[0, 3] = 0.0  # a zero row: the 1e-12 clamp
    xn = torch.nn.functional.normalize(x, dim=-1)
    gram = torch.matmul(xn, xn.transpose(-1, -2))
    assert torch.equal(cosine_gram(x), gram)
    assert torch.equal(cosine_distance(x), 1.0 - gram)
