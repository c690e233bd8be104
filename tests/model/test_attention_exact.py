"""Exact baseline (protein_performer.model.attention.SoftmaxAttention) against a naive softmax."""

from __future__ import annotations

import pytest
import torch

from protein_performer.model.attention import SoftmaxAttention
from protein_performer.model.favor import FavorAttention, reference


def qkv(b=2, h=3, length=29, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(3))


naive = reference.exact_attention


@pytest.mark.parametrize("causal", [False, True])
def test_forward_equals_naive_softmax(causal):
    q, k, v = qkv()
    mask = torch.zeros(2, 29, dtype=torch.bool)
    mask[0, 20:] = True
    mask[1, [0, 5, 6]] = True
    attn = SoftmaxAttention(causal=causal)
    torch.testing.assert_close(attn(q, k, v), naive(q, k, v, causal), atol=1e-12, rtol=1e-12)
    out = attn(q, k, v, key_padding_mask=mask)
    if causal:  # query 0 of sequence 1 sees only a pad: no key at all, zero output
        assert out[1, :, 0].abs().max() == 0
        out, ref = out[:, :, 1:], naive(q, k, v, causal, mask)[:, :, 1:]
    else:
        ref = naive(q, k, v, causal, mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_equals_running_without_pads(causal):
    q, k, v = qkv(seed=1)
    mask = torch.zeros(2, 29, dtype=torch.bool)
    mask[0, [2, 3, 28]] = True
    mask[1, 15:] = True
    attn = SoftmaxAttention(causal=causal)
    out = attn(q, k, v, key_padding_mask=mask)
    for i in range(2):
        keep = ~mask[i]
        alone = attn(q[i : i + 1, :, keep], k[i : i + 1, :, keep], v[i : i + 1, :, keep])
        torch.testing.assert_close(out[i : i + 1, :, keep], alone, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matrix_agrees_with_forward(causal):
    q, k, v = qkv(seed=2)
    mask = torch.zeros(2, 29, dtype=torch.bool)
    mask[1, 22:] = True
    attn = SoftmaxAttention(causal=causal)
    amap = attn.attention_matrix(q, k, key_padding_mask=mask, block_rows=5)
    assert amap.shape == (2, 3, 29, 29) and amap.dtype == torch.float64
    torch.testing.assert_close(amap, attn.attention_matrix(q, k, key_padding_mask=mask), atol=1e-14, rtol=0)
    torch.testing.assert_close(amap @ v, attn(q, k, v, key_padding_mask=mask), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 3, 29, dtype=torch.float64), atol=1e-12, rtol=0)
    assert attn.attention_matrix(q.half(), k.half()).dtype == torch.float32
    assert amap[1, :, :, 22:].abs().max() == 0
    if causal:
        assert amap.triu(1).abs().max() == 0


def test_same_interface_and_no_parameters():
    """Exact and FAVOR+ cores are interchangeable: same call signatures, no parameters, so a model
    built with either has the same parameter names (weights of an exact model load into FAVOR+)."""
    q, k, v = qkv(1, 2, 16, 16, seed=3, dtype=torch.float32)
    for causal in (False, True):
        exact, favor = SoftmaxAttention(causal=causal), FavorAttention(16, 64, causal=causal)
        for attn in (exact, favor):
            assert list(attn.parameters()) == []
            assert attn(q, k, v).shape == q.shape
            assert attn(q, k, v, key_padding_mask=torch.zeros(1, 16, dtype=torch.bool)).shape == q.shape
            assert attn.attention_matrix(q, k).shape == (1, 2, 16, 16)
        before = exact(q, k, v)
        exact.redraw(5)  # nothing to draw: a no-op
        assert torch.equal(before, exact(q, k, v))


def test_bad_mask_is_reported():
    q, k, v = qkv(1, 1, 8, 16)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \(batch, length\)"):
        SoftmaxAttention()(q, k, v, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))
