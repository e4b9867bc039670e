"""Reusable layers of the image-text fusion encoder (ALBEF's cross-attention half of BERT).

:class:`FusionTower` is what ``encoder.fusion`` builds and what the fusion objectives (``objective.itm``,
``objective.mlm``, ``objective.prefixlm``) consume. It lives here, not in a node module, because node
modules never import each other. Also here: :class:`TokenHead`, BERT's masked-LM head (optionally tied to
the text tower's word embeddings), and :func:`word_embeddings`, which finds those embeddings.

Layout of one :class:`FusionLayer` (post-LN, as BERT with ``add_cross_attention``)::

    x = LN(x + SelfAttention(x, text mask))        # bidirectional over the caption's tokens
    x = LN(x + CrossAttention(x, image tokens))    # every image token, CLS included
    x = LN(x + MLP(x))

Every attention runs through :func:`vlpgraph.layers.attention.attend`, so the ``attention_backend`` switch of
:func:`vlpgraph.layers.attention.set_attention_backend` applies.
"""

from __future__ import annotations

import torch
from torch import nn

from vlpgraph.layers.attention import attend
from vlpgraph.engine.ports import Forward, TextTower, VisionTower

LN_EPS = 1e-12  # BERT's layer_norm_eps


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head attention through :func:`attend`; keys/values come from ``context`` (width
    ``kv_width``) when given, else from ``x`` itself. ``attention_backend`` selects the backend."""

    def __init__(self, width: int, heads: int, kv_width: int | None = None, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        kv_width = kv_width or width
        self.heads = heads
        self.dropout = dropout
        self.attention_backend = backend
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)  # projects image tokens of another width to the text width
        self.value = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # [B, H, N, Dh]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(ctx)), self._heads(self.value(ctx))
        o = attend(q, k, v, mask=mask, backend=self.attention_backend,
                   dropout_p=self.dropout if self.training else 0.0)
        b, _, n, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class FusionLayer(nn.Module):
    """Self-attention over text, cross-attention to image tokens, MLP; each followed by residual + LayerNorm."""

    def __init__(self, width: int, heads: int, image_width: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        hidden = max(1, int(width * mlp_ratio))
        self.self_attn = Attention(width, heads, dropout=dropout, backend=backend)
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.cross_attn = Attention(width, heads, kv_width=image_width, dropout=dropout, backend=backend)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm3 = nn.LayerNorm(width, eps=LN_EPS)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor | None, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x, mask=self_mask)))
        x = self.norm2(x + self.drop(self.cross_attn(x, context=image_tokens)))
        return self.norm3(x + self.drop(self.mlp(x)))


class FusionTower(nn.Module):
    """Fusion encoder: text tokens [B, L, C] attend to each other (padding masked) and to the image's
    tokens [B, 1+N, Cv]; output [B, L, C], position 0 the fused CLS.

    ``width`` = the text tower's width C; ``text`` / ``vision`` are the towers whose tokens it fuses,
    held by reference (they are their own graph nodes, with their own entry in the trial's modules).
    """

    def __init__(self, text: TextTower, vision: VisionTower, depth: int = 2, heads: int = 2, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, attention: str = "auto"):
        super().__init__()
        self._towers = (text, vision)
        self.width = int(text.width)
        self.image_width = int(vision.width)
        self.layers = nn.ModuleList(
            FusionLayer(self.width, heads, self.image_width, mlp_ratio, dropout, attention) for _ in range(depth)
        )
        self.apply(_init_bert)

    @property
    def text(self) -> TextTower:
        return self._towers[0]

    @property
    def vision(self) -> VisionTower:
        return self._towers[1]

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor | None, image_tokens: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text_tokens [B, L, C]; text_mask [B, L] (1/True = a real token) or None; image_tokens [B, 1+N, Cv].

        attn_mask: optional boolean [B, L, L] self-attention mask (True = query i may attend key j) used
        instead of the padding mask, e.g. a prefix-LM mask; it must already exclude padded keys.
        Returns [B, L, C].
        """
        if attn_mask is not None:
            mask = attn_mask.bool()[:, None]  # [B, 1, L, L]
        elif text_mask is not None:
            mask = text_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: padded keys are never attended
        else:
            mask = None
        x = text_tokens
        for layer in self.layers:
            x = layer(x, mask, image_tokens)
        return x

    def fuse(self, fwd: Forward, ids_key: str = "input_ids", mask_key: str = "attention_mask",
             images_key: str = "images") -> torch.Tensor:
        """Fused tokens [B, L, C] of the batch's captions ``ids_key``/``mask_key`` with its images
        ``images_key``. The tower passes and the fusion pass are memoised in ``fwd``."""

        def compute() -> torch.Tensor:
            text = fwd.text_tokens(self.text, ids_key, mask_key)
            image = fwd.image_tokens(self.vision, images_key)
            return self(text, fwd.batch[mask_key], image)

        return fwd.memo(("fusion", id(self), ids_key, mask_key, images_key), compute)


# ------------------------------------------------------------------------------------- token heads


def word_embeddings(text: nn.Module) -> nn.Embedding | None:
    """The text tower's input word embeddings, when it exposes them (``get_input_embeddings()`` on the
    tower, or on its transformers model ``.bert`` as ``encoder.text`` has); else None."""
    for owner in (text, getattr(text, "bert", None)):
        fn = getattr(owner, "get_input_embeddings", None)
        if callable(fn):
            emb = fn()
            if isinstance(emb, nn.Embedding):
                return emb
    return None


class TokenHead(nn.Module):
    """BERT's language-model head: Linear(C, C) -> GELU -> LayerNorm -> Linear(C, vocab).

    With ``tied`` (an ``nn.Embedding`` [vocab, C]) the decoder's weight *is* that embedding's weight
    (BERT and ALBEF tie them); the decoder keeps its own bias.
    """

    def __init__(self, width: int, vocab_size: int, tied: nn.Embedding | None = None):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=LN_EPS))
        if tied is not None:
            if tied.weight.shape[1] != width:
                raise ValueError(f"tied embeddings have width {tied.weight.shape[1]}, the head {width}")
            vocab_size = tied.weight.shape[0]
        self.decoder = nn.Linear(width, vocab_size)
        self.apply(_init_bert)
        if tied is not None:
            self.decoder.weight = tied.weight
        self.tied = tied is not None
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))
