"""One attention function for every tower: ``attend(q, k, v, ...)`` with backends xformers | sdpa | math.

Layout is ``[B, H, L, Dh]`` for q, k, v and the output (the layout of
``torch.nn.functional.scaled_dot_product_attention``). Backends:

- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only; fp16/bf16 is what it is for).
  It wants ``[B, L, H, Dh]`` and an additive bias of exactly ``[B, H, Lq, Lk]`` whose strides are
  multiples of 8 elements, which :func:`_xformers_bias` arranges. Imported lazily: importing it prints
  warnings and takes seconds.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.
- ``math``: explicit ``softmax(q k^T * scale + mask) v``; the only backend that can return the
  attention weights (evaluators that draw attention maps use it).
- ``auto``: xformers for CUDA half/bf16 tensors when xformers imports, else sdpa. The environment
  variable ``VLPGRAPH_ATTENTION`` (xformers | sdpa | math) says what ``auto`` means instead, like
  timm's global fused-attention switch; an explicit backend name is always honoured.

Masks: boolean (True = attend) or additive float, broadcastable to ``[B, H, Lq, Lk]``. ``causal`` is
top-left aligned (query i sees keys 0..i), as in SDPA's ``is_causal``; it may be combined with a mask.

timm models route through it with :class:`RoutedAttention` (timm's ``Attention`` with the same weights,
its core replaced by :func:`attend`) and :func:`route_timm_attention`; encoder.vit and objective.mae's
decoder blocks use them. transformers models route through it with :func:`transformers_attention_name`.

Modules whose attention goes through :func:`attend` carry an ``attention_backend`` attribute (or
property); :func:`set_attention_backend` switches every such module inside a model, which is how
tests compare backends on the same weights.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn

from vlpgraph.errors import UserError

BACKENDS = ("auto", "xformers", "sdpa", "math")
ENV_VAR = "VLPGRAPH_ATTENTION"
_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    """True when ``xformers.ops.memory_efficient_attention`` imports (its import warnings are silenced)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build raising something else
        return False
    return True


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise UserError(f"{what}: unknown attention backend {name!r} (choose one of {', '.join(BACKENDS)})")
    return name


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend (``xformers`` | ``sdpa`` | ``math``) that ``name`` means for tensors on
    ``device`` of ``dtype``. Raises :class:`UserError` for an unknown name, and for xformers on a
    device other than CUDA or without xformers installed."""
    _check_name(name, "attention")
    device = torch.device(device)
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            name = _check_name(env, f"environment variable {ENV_VAR}")
    if name == "auto":
        if device.type == "cuda" and dtype in _HALF and xformers_available():
            return "xformers"
        return "sdpa"
    if name == "xformers":
        if device.type != "cuda":
            raise UserError(
                f"attention backend 'xformers' needs CUDA tensors, got {device.type} "
                "(use 'auto' or 'sdpa' on this machine)"
            )
        if not xformers_available():
            raise UserError(
                "attention backend 'xformers' is not available: install it with "
                "`pip install 'vlpgraph[gpu]'` (or use 'auto' / 'sdpa')"
            )
    return name


def _bool_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _causal_bool(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    # top-left aligned, like SDPA's is_causal: query i attends keys j <= i
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril_()


def _merged_mask(mask, causal: bool, lq: int, lk: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """mask (+ causal) as one tensor broadcastable to [B,H,Lq,Lk]: bool if mask is bool or absent,
    else additive in ``dtype``."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    if not causal:
        return mask
    c = _causal_bool(lq, lk, device)
    if mask is None:
        return c
    if mask.dtype == torch.bool:
        return mask & c
    return mask.masked_fill(~c, float("-inf"))


def _math(q, k, v, mask, causal, scale, dropout_p):
    lq, lk = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    m = _merged_mask(mask, causal, lq, lk, scores.dtype, q.device)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return torch.matmul(weights, v), weights


def _sdpa(q, k, v, mask, causal, scale, dropout_p):
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    m = _merged_mask(mask, causal, q.shape[-2], k.shape[-2], q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, scale=scale)


def _xformers_bias(mask: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """An additive bias of exactly ``shape`` = [B,H,Lq,Lk] as xformers wants it: dtype of q, every
    stride but the last a multiple of 8 (storage padded on Lk, then sliced), broadcast dims expanded
    with stride 0 (no copy)."""
    b, h, lq, lk = shape
    m = mask if mask.dtype != torch.bool else _bool_to_additive(mask, dtype)
    m = m.to(dtype)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    small = tuple(s if s == 1 else full for s, full in zip(m.shape, shape))
    lk_pad = (lk + 7) // 8 * 8
    store = torch.zeros(*small[:3], lk_pad, dtype=dtype, device=mask.device)
    store[..., :lk].copy_(m.expand(*small[:3], lk))
    return store[..., :lk].expand(b, h, lq, lk)


def _xformers(q, k, v, mask, causal, scale, dropout_p):
    import xformers.ops as xops

    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))  # [B, L, H, Dh] views, last stride 1
    if mask is None and causal:
        bias = xops.LowerTriangularMask()  # top-left aligned, as SDPA's is_causal
    elif mask is None:
        bias = None
    else:
        merged = _merged_mask(mask, causal, lq, lk, q.dtype, q.device)
        bias = _xformers_bias(merged, (b, h, lq, lk), q.dtype)
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    backend: str = "auto",
    scale: float | None = None,
    return_weights: bool = False,
    dropout_p: float = 0.0,
):
    """Scaled dot-product attention.

    q: [B, H, Lq, Dh]; k, v: [B, H, Lk, Dh]. mask: bool (True = attend) or additive float,
    broadcastable to [B, H, Lq, Lk]. causal: top-left aligned causal mask (combines with ``mask``).
    scale: defaults to Dh ** -0.5. dropout_p: dropout on the attention weights (pass 0 in eval).

    Returns the output [B, H, Lq, Dh], or ``(output, weights [B, H, Lq, Lk])`` when
    ``return_weights`` — which only the ``math`` backend computes (``auto`` then means math; asking
    sdpa or xformers for weights is an error).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if return_weights:
        _check_name(backend, "attention")
        if backend not in ("auto", "math"):
            raise ValueError(f"return_weights=True needs the 'math' attention backend, not {backend!r}")
        return _math(q, k, v, mask, causal, scale, dropout_p)
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "xformers" and backend == "auto" and q.shape[-1] % 8:
        name = "sdpa"  # xformers' kernels want head dims that are multiples of 8; auto never fails on it
    if name == "sdpa":
        return _sdpa(q, k, v, mask, causal, scale, dropout_p)
    if name == "math":
        return _math(q, k, v, mask, causal, scale, dropout_p)[0]
    return _xformers(q, k, v, mask, causal, scale, dropout_p)


def set_attention_backend(module: nn.Module, backend: str) -> int:
    """Switch every submodule of ``module`` that routes through :func:`attend` (it has an
    ``attention_backend`` attribute or property) to ``backend``; returns how many were switched.
    Weights are untouched, so outputs of two backends can be compared on the same model."""
    _check_name(backend, "set_attention_backend")
    n = 0
    for m in module.modules():
        if hasattr(m, "attention_backend"):
            m.attention_backend = backend
            n += 1
    return n


# ------------------------------------------------------------------------------ timm attention


class RoutedAttention(TimmAttention):
    """timm's ``Attention`` with the scaled-dot-product step done by :func:`vlpgraph.layers.attention.attend`.

    Same parameters and state-dict keys as timm's; the forward mirrors timm 1.0.31's line by line
    (qkv, q_norm/k_norm, attention with attn_drop, norm, optional gate, proj, proj_drop).
    ``attention_backend`` picks the backend. With ``keep_weights`` set, the math backend runs and the
    attention weights [B, H, N, N] are kept in ``last_weights`` (for attention maps).
    """

    attention_backend: str = "auto"
    keep_weights: bool = False
    last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_drop.p if self.training else 0.0
        if self.keep_weights:
            x, w = attend(q, k, v, attn_mask, is_causal, "math", self.scale, return_weights=True, dropout_p=p)
            self.last_weights = w.detach()
        else:
            x = attend(q, k, v, attn_mask, is_causal, self.attention_backend, self.scale, dropout_p=p)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def route_timm_attention(model: torch.nn.Module, backend: str = "auto") -> int:
    """Make every timm ``Attention`` inside ``model`` a :class:`RoutedAttention` (in place; weights and
    keys unchanged) using ``backend``. Returns how many modules were routed."""
    n = 0
    for m in model.modules():
        if type(m) is TimmAttention:
            m.__class__ = RoutedAttention
        if isinstance(m, RoutedAttention):
            m.attention_backend = backend
            n += 1
    return n


# ------------------------------------------------------------------------------- transformers


def transformers_attention_name(backend: str) -> str:
    """The ``attn_implementation`` name under which transformers models route through
    :func:`attend` with ``backend`` ("vlpgraph_sdpa", ...), registering it on first use.

    Both registries are filled: ``AttentionInterface`` (the attention function) and
    ``AttentionMaskInterface`` (with transformers' SDPA mask builder, so the function receives a
    boolean [B, 1, Lq, Lk] mask, True = attend, or None when nothing is masked; without that entry
    transformers would pass no padding mask at all to an unknown implementation).
    """
    _check_name(backend, "attention")
    name = f"vlpgraph_{backend}"
    _register_transformers(name, backend)
    return name


@functools.lru_cache(maxsize=None)
def _register_transformers(name: str, backend: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # transformers' signature: q/k/v [B, H, L, Dh]; returns ([B, L, H, Dh], weights or None)
        # as transformers' own sdpa function: causal only when no mask was built (it skips the mask
        # for unpadded causal batches) and there is more than one query (a cached decoding step)
        is_causal = kwargs.get("is_causal", getattr(module, "is_causal", False))
        causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
        if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the k/v heads
            rep = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask[..., : key.shape[-2]]
        if backend == "math" and kwargs.get("output_attentions"):
            out, weights = attend(query, key, value, attention_mask, causal, "math", scaling, True, dropout)
        else:
            out, weights = attend(query, key, value, attention_mask, causal, backend, scaling, False, dropout), None
        return out.transpose(1, 2), weights

    attention_fn.__name__ = f"{name}_attention"
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, sdpa_mask)
