"""vlpgraph.layers.attention: every backend against a hand-written reference, backend resolution, xformers on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from vlpgraph.layers import attention
from vlpgraph.layers.attention import attend, resolve_backend
from vlpgraph.errors import UserError

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none on this machine)")


def reference(q, k, v, allowed=None, bias=None, scale=None):
    """Attention written out per (batch, head, query): softmax over allowed keys of q.k*scale + bias."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    w = torch.zeros(B, H, Lq, Lk, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                s = [float(q[b, h, i] @ k[b, h, j]) * scale for j in range(Lk)]
                if bias is not None:
                    s = [s[j] + float(bias[b, h, i, j]) for j in range(Lk)]
                ok = [True] * Lk if allowed is None else [bool(allowed[b, h, i, j]) for j in range(Lk)]
                m = max(s[j] for j in range(Lk) if ok[j])
                e = [math.exp(s[j] - m) if ok[j] else 0.0 for j in range(Lk)]
                z = sum(e)
                for j in range(Lk):
                    w[b, h, i, j] = e[j] / z
                out[b, h, i] = w[b, h, i] @ v[b, h]
    return out.float(), w.float()


def qkv(B=2, H=3, Lq=5, Lk=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g), torch.randn(B, H, Lk, D, generator=g), torch.randn(B, H, Lk, D, generator=g))


def causal_allowed(B, H, Lq, Lk):
    return torch.tensor([[j <= i for j in range(Lk)] for i in range(Lq)]).expand(B, H, Lq, Lk)


CPU_BACKENDS = ["sdpa", "math", "auto"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_mask_and_scale(backend):
    q, k, v = qkv()
    ref, _ = reference(q, k, v)
    torch.testing.assert_close(attend(q, k, v, backend=backend), ref, atol=1e-5, rtol=1e-5)
    ref, _ = reference(q, k, v, scale=0.3)
    torch.testing.assert_close(attend(q, k, v, backend=backend, scale=0.3), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_key_padding_bool_mask(backend):
    q, k, v = qkv(Lq=4, Lk=6)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = keep[:, None, None, :]  # [B,1,1,Lk] broadcast over heads and queries
    ref, _ = reference(q, k, v, allowed=mask.expand(2, 3, 4, 6))
    out = attend(q, k, v, mask=mask, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the mask matters: without it the first sample's output differs
    assert (attend(q, k, v, backend=backend)[0] - ref[0]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_additive_float_mask(backend):
    q, k, v = qkv()
    bias = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    bias[0, :, :, 3] = float("-inf")
    ref, _ = reference(q, k, v, bias=torch.where(torch.isinf(bias), torch.zeros_like(bias), bias),
                       allowed=~torch.isinf(bias))
    torch.testing.assert_close(attend(q, k, v, mask=bias, backend=backend), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 6)])
def test_causal(backend, lq, lk):
    q, k, v = qkv(Lq=lq, Lk=lk)
    ref, _ = reference(q, k, v, allowed=causal_allowed(2, 3, lq, lk))  # top-left aligned, like SDPA
    torch.testing.assert_close(attend(q, k, v, causal=True, backend=backend), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causal_combined_with_mask(backend):
    q, k, v = qkv(Lq=6, Lk=6)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False
    mask = keep[:, None, None, :]
    allowed = causal_allowed(2, 3, 6, 6) & mask
    ref, _ = reference(q, k, v, allowed=allowed)
    torch.testing.assert_close(attend(q, k, v, mask=mask, causal=True, backend=backend), ref, atol=1e-5, rtol=1e-5)
    # additive form of the same mask
    add = torch.zeros(2, 1, 1, 6).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attend(q, k, v, mask=add, causal=True, backend=backend), ref, atol=1e-5, rtol=1e-5)


def test_return_weights_only_on_math():
    q, k, v = qkv()
    mask = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    ref, ref_w = reference(q, k, v, allowed=mask.expand(2, 3, 5, 5))
    out, w = attend(q, k, v, mask=mask, backend="math", return_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    assert w.shape == (2, 3, 5, 5) and torch.all(w[..., 3] == 0)
    out2, _ = attend(q, k, v, mask=mask, backend="auto", return_weights=True)  # auto -> math here
    torch.testing.assert_close(out2, ref, atol=1e-5, rtol=1e-5)
    for b in ("sdpa", "xformers"):
        with pytest.raises(ValueError, match="math"):
            attend(q, k, v, backend=b, return_weights=True)


def test_gradients_agree_between_sdpa_and_math():
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    grads = {}
    for b in ("sdpa", "math"):
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v, mask=mask, causal=True, backend=b).square().sum().backward()
        grads[b] = [t.grad.clone() for t in (q, k, v)]
    for a, c in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- resolution


def test_auto_resolves_to_sdpa_on_cpu(monkeypatch):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", "cpu", dt) == "sdpa"
    assert resolve_backend("sdpa", "cpu", torch.float32) == "sdpa"
    assert resolve_backend("math", torch.device("cpu"), torch.float32) == "math"


def test_auto_on_cuda_depends_on_dtype_and_xformers(monkeypatch):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "xformers"
    assert resolve_backend("auto", "cuda:0", torch.float16) == "xformers"
    assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa"
    with pytest.raises(UserError, match="not available"):
        resolve_backend("xformers", "cuda", torch.bfloat16)


def test_env_override_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv(attention.ENV_VAR, "math")
    assert resolve_backend("auto", "cpu", torch.float32) == "math"
    assert resolve_backend("sdpa", "cpu", torch.float32) == "sdpa"  # explicit names win
    monkeypatch.setenv(attention.ENV_VAR, "xformers")
    with pytest.raises(UserError, match="CUDA"):
        resolve_backend("auto", "cpu", torch.float32)
    monkeypatch.setenv(attention.ENV_VAR, "flash")
    with pytest.raises(UserError, match="VLPGRAPH_ATTENTION"):
        resolve_backend("auto", "cpu", torch.float32)
    monkeypatch.setenv(attention.ENV_VAR, "auto")
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"


def test_env_override_reaches_attend(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_math", lambda *a: calls.append(1) or (a[2], None))
    monkeypatch.setenv(attention.ENV_VAR, "math")
    q, k, v = qkv()
    attend(q, k, v)
    assert calls == [1]


def test_auto_avoids_xformers_for_head_dims_it_cannot_run(monkeypatch):
    """auto only hands xformers head dims that are multiples of 8; an explicit 'xformers' is passed on."""
    used = []
    monkeypatch.setattr(attention, "resolve_backend", lambda *a: "xformers")
    monkeypatch.setattr(attention, "_xformers", lambda q, *a: used.append("xformers") or q)
    q, k, v = qkv(D=6)
    ref, _ = reference(q, k, v)
    torch.testing.assert_close(attend(q, k, v), ref, atol=1e-5, rtol=1e-5)  # fell back to sdpa
    assert used == []
    attend(*qkv(D=8))
    attend(q, k, v, backend="xformers")
    assert used == ["xformers", "xformers"]


def test_unknown_backend_and_xformers_on_cpu_are_clear_errors():
    q, k, v = qkv()
    with pytest.raises(UserError, match="unknown attention backend 'flash'"):
        attend(q, k, v, backend="flash")
    with pytest.raises(UserError, match="needs CUDA"):
        attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="xformers")


def test_xformers_bias_layout():
    """The bias handed to xformers: exact [B,H,Lq,Lk] shape, q's dtype, strides multiples of 8, same values."""
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    merged = attention._merged_mask(keep, True, 5, 5, torch.bfloat16, torch.device("cpu"))
    bias = attention._xformers_bias(merged, (2, 3, 5, 5), torch.bfloat16)
    assert bias.shape == (2, 3, 5, 5) and bias.dtype == torch.bfloat16
    assert all(s % 8 == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1
    expected = torch.zeros(2, 3, 5, 5).masked_fill(~(keep & causal_allowed(2, 3, 5, 5)), float("-inf"))
    assert torch.equal(bias.float(), expected)
    add = torch.randn(1, 3, 5, 5)
    b2 = attention._xformers_bias(add, (2, 3, 5, 5), torch.float16)
    assert all(s % 8 == 0 for s in b2.stride()[:-1])
    torch.testing.assert_close(b2.float(), add.half().float().expand(2, 3, 5, 5))


class _FakeLowerTriangularMask:
    pass


def _fake_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """CPU stand-in with xformers' documented semantics and input checks ([B, M, H, K] layout, bias of
    exactly [B, H, Mq, Mk] with strides multiple of 8), to test the adapter's glue without a GPU."""
    B, Mq, H, K = query.shape
    Mk = key.shape[1]
    assert key.shape == value.shape == (B, Mk, H, K) and query.stride(-1) == 1
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    s = (q * (K**-0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    if isinstance(attn_bias, _FakeLowerTriangularMask):
        s = s.masked_fill(~causal_allowed(B, H, Mq, Mk), float("-inf"))
    elif attn_bias is not None:
        assert attn_bias.shape == (B, H, Mq, Mk) and attn_bias.dtype == query.dtype
        assert all(st % 8 == 0 for st in attn_bias.stride()[:-1]) and attn_bias.stride(-1) == 1
        s = s + attn_bias
    return (s.softmax(-1) @ v).transpose(1, 2).contiguous()


@pytest.mark.parametrize("case", ["none", "causal", "padding", "padding+causal", "additive"])
def test_xformers_adapter_glue(monkeypatch, case):
    import sys
    import types

    fake = types.ModuleType("xformers.ops")
    fake.memory_efficient_attention = _fake_memory_efficient_attention
    fake.LowerTriangularMask = _FakeLowerTriangularMask
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    sys.modules["xformers"].ops = fake
    q, k, v = qkv(Lq=5, Lk=7 if case in ("none", "padding", "additive") else 5)
    Lk = k.shape[2]
    keep = torch.ones(2, Lk, dtype=torch.bool)
    keep[0, -2:] = False
    mask = {"padding": keep[:, None, None, :], "padding+causal": keep[:, None, None, :],
            "additive": torch.randn(1, 3, 5, Lk)}.get(case)
    causal = "causal" in case
    out = attention._xformers(q, k, v, mask, causal, 0.5, 0.0)
    assert out.shape == q.shape
    torch.testing.assert_close(out, attend(q, k, v, mask=mask, causal=causal, scale=0.5, backend="math"),
                               atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", ["none", "causal", "padding", "padding+causal", "additive"])
@pytest.mark.parametrize("L", [65, 197])
def test_xformers_matches_sdpa_bf16(case, L):
    if not attention.xformers_available():
        pytest.skip("xformers is not installed (pip install 'vlpgraph[gpu]')")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, D = 4, 4, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g) for _ in range(3))
    mask = None
    if "padding" in case:
        keep = torch.ones(B, L, dtype=torch.bool, device="cuda")
        keep[0, L // 2:] = False
        mask = keep[:, None, None, :]
    if case == "additive":
        mask = torch.randn(B, H, L, L, device="cuda", generator=g)
    causal = "causal" in case
    ref = attend(q, k, v, mask=mask, causal=causal, backend="math")  # fp32 reference
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    mb = mask.bfloat16() if mask is not None and mask.dtype != torch.bool else mask
    xf = attend(qb, kb, vb, mask=mb, causal=causal, backend="xformers")
    sd = attend(qb, kb, vb, mask=mb, causal=causal, backend="sdpa")
    assert xf.dtype == torch.bfloat16 and xf.shape == (B, H, L, D)
    assert (xf.float() - sd.float()).abs().max() < 2e-2
    assert (xf.float() - ref).abs().max() < 3e-2
    xf.float().square().sum().backward()  # backward runs with the padded/expanded bias
    assert torch.isfinite(qb.grad).all()


@pytest.mark.gpu
@needs_cuda
def test_auto_is_xformers_on_cuda_bf16():
    if not attention.xformers_available():
        pytest.skip("xformers is not installed (pip install 'vlpgraph[gpu]')")
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "xformers"
    assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"
