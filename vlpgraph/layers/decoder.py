"""A causal caption decoder conditioned on image tokens (CoCa's text decoder, MUG's caption decoder).

:class:`CaptionTransformer` implements :class:`vlpgraph.engine.ports.CaptionDecoder`; ``decoder.caption`` builds
it, ``objective.caption`` trains it and ``evaluator.captioning`` trains a fresh one on a frozen encoder.
Layout (pre-LN, as CoCa / open_clip's multimodal decoder)::

    x = token embedding + learned position
    uni_depth   x [ x = x + SelfAttention(LN(x), causal); x = x + MLP(LN(x)) ]
    multi_depth x [ x = x + SelfAttention(LN(x), causal)
                    x = x + CrossAttention(LN(x), LN(image tokens))     # keys/values projected from image_width
                    x = x + MLP(LN(x)) ]
    logits = LN(x) @ token_embedding^T + bias                           # tied by default

Every attention goes through :func:`vlpgraph.layers.attention.attend` (via
:class:`vlpgraph.layers.fusion.Attention`), so ``set_attention_backend`` applies. Position t's logits
predict token t+1 and depend only on tokens <= t and on the image.

Generation (:meth:`CaptionTransformer.generate`) re-runs the whole prefix at every step: there is no
key/value cache. Captions here are a few dozen tokens, so the quadratic cost is small and the code stays
obviously equal to the teacher-forced forward (a test checks exactly that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.layers.fusion import Attention


def _init(module: nn.Module) -> None:
    """normal(0, 0.02) weights and embeddings, zero biases, unit LayerNorms (BERT / GPT-2's init)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def caption_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy: logits [B, L, V] at position t against input_ids[:, t+1], over the
    caption's real tokens after BOS (EOS included, padding excluded)."""
    targets = input_ids[:, 1:]
    real = attention_mask[:, 1:].bool()
    if not real.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][real].float(), targets[real], label_smoothing=label_smoothing)


class DecoderLayer(nn.Module):
    """One pre-LN decoder layer: causal self-attention, optional cross-attention to image tokens, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 image_width: int | None = None, backend: str = "auto"):
        super().__init__()
        hidden = max(1, int(width * mlp_ratio))
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, dropout=dropout, backend=backend)
        self.cross = image_width is not None
        if self.cross:
            self.norm2 = nn.LayerNorm(width)
            self.norm_image = nn.LayerNorm(image_width)
            self.cross_attn = Attention(width, heads, kv_width=image_width, dropout=dropout, backend=backend)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, C]; self_mask bool broadcastable to [B, H, L, L] (True = attend); image_tokens [B, M, Cv]."""
        x = x + self.drop(self.self_attn(self.norm1(x), mask=self_mask))
        if self.cross:
            x = x + self.drop(self.cross_attn(self.norm2(x), context=self.norm_image(image_tokens)))
        return x + self.drop(self.mlp(self.norm3(x)))


class CaptionTransformer(ports.CaptionDecoder):
    """Causal caption decoder: ``uni_depth`` text-only layers, then ``multi_depth`` layers that also
    cross-attend to image tokens of width ``image_width``.

    ``tokenizer`` gives the vocabulary and the ids: BOS = ``cls_id``, EOS = ``sep_id``, padding =
    ``pad_id``; ``max_len`` (default: the tokenizer's) is the number of learned positions, BOS included.
    ``tie_embeddings``: the output projection's weight is the token embedding (it keeps its own bias).
    """

    def __init__(self, tokenizer: ports.Tokenizer, image_width: int, width: int = 128, heads: int = 2,
                 uni_depth: int = 1, multi_depth: int = 1, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 max_len: int | None = None, tie_embeddings: bool = True, attention: str = "auto"):
        super().__init__()
        self.tokenizer = tokenizer
        self.image_width = int(image_width)
        self.width = int(width)
        self.max_len = int(max_len or tokenizer.max_len)
        self.vocab_size = int(tokenizer.vocab_size)
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(self.max_len, width))
        self.uni_layers = nn.ModuleList(
            DecoderLayer(width, heads, mlp_ratio, dropout, None, attention) for _ in range(uni_depth))
        self.multi_layers = nn.ModuleList(
            DecoderLayer(width, heads, mlp_ratio, dropout, self.image_width, attention) for _ in range(multi_depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.vocab_size)
        self.drop = nn.Dropout(dropout)
        self.apply(_init)
        nn.init.normal_(self.position_embedding, std=0.01)
        if tie_embeddings:
            self.head.weight = self.token_embedding.weight

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               image_tokens: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [B, L, C] (what :attr:`head` turns into logits)."""
        b, l = input_ids.shape
        if l > self.max_len:
            raise ValueError(f"caption decoder: {l} tokens but only {self.max_len} positions (max_len)")
        if image_tokens.shape[0] != b or image_tokens.shape[-1] != self.image_width:
            raise ValueError(f"caption decoder: image tokens {tuple(image_tokens.shape)} for {b} captions of a "
                             f"decoder reading width {self.image_width}")
        # causal (query t sees keys <= t), and padded keys never attended: [B, 1, L, L]
        mask = torch.ones(l, l, dtype=torch.bool, device=input_ids.device).tril_()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            mask = mask | torch.eye(l, dtype=torch.bool, device=input_ids.device)  # a pad query sees itself: no empty row
        x = self.drop(self.token_embedding(input_ids) + self.position_embedding[:l])
        for layer in self.uni_layers:
            x = layer(x, mask)
        for layer in self.multi_layers:
            x = layer(x, mask, image_tokens)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                image_tokens: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] (BOS first), attention_mask [B, L] (1 = real token) or None, image_tokens
        [B, M, image_width] -> logits [B, L, vocab]; position t predicts token t+1."""
        return self.head(self.hidden(input_ids, attention_mask, image_tokens))

    # -------------------------------------------------------------------------------- generation

    def _steps(self, max_len: int | None) -> int:
        """Tokens to generate at most (EOS included): BOS takes one of the ``max_len`` positions."""
        limit = self.max_len - 1
        return limit if max_len is None else max(1, min(int(max_len), limit))

    def never_generated(self) -> list[int]:
        """Ids generation never emits: padding, BOS and [MASK] (no caption target is one of them; an
        untrained decoder with tied embeddings tends to repeat BOS)."""
        tok = self.tokenizer
        return sorted({tok.pad_id, tok.cls_id, getattr(tok, "mask_id", tok.pad_id)})

    def _next_logprobs(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, V] of the token after ``ids``, over the tokens generation may emit."""
        # Right-padding after EOS sits after every real token, so causality alone keeps it out.
        logits = self(ids, None, image_tokens)[:, -1].float()
        logits[:, self.never_generated()] = float("-inf")
        return F.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def generate(self, image_tokens: torch.Tensor, max_len: int | None = None, beams: int = 1,
                 length_penalty: float = 1.0) -> list[list[int]]:
        """Captions for image_tokens [B, M, image_width]: per image, the token ids after BOS up to (not
        including) EOS, at most ``max_len`` tokens (default and cap: the decoder's positions - 1, EOS
        counted), never emitting :meth:`never_generated`. ``beams`` = 1: greedy; more: beam search, the final beam chosen by
        sum log-prob / (generated tokens incl. EOS) ** ``length_penalty`` (0 = plain sum log-prob).
        Call it in eval mode (dropout off)."""
        steps = self._steps(max_len)
        if beams <= 1:
            return self._greedy(image_tokens, steps)
        return self._beam(image_tokens, steps, int(beams), float(length_penalty))

    def _greedy(self, image_tokens: torch.Tensor, steps: int) -> list[list[int]]:
        tok = self.tokenizer
        b = image_tokens.shape[0]
        ids = torch.full((b, 1), tok.cls_id, dtype=torch.long, device=image_tokens.device)
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        for _ in range(steps):
            nxt = self._next_logprobs(ids, image_tokens).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done = done | (nxt == tok.sep_id)
            if bool(done.all()):
                break
        return [self._strip(row) for row in ids[:, 1:].tolist()]

    def _beam(self, image_tokens: torch.Tensor, steps: int, k: int, alpha: float) -> list[list[int]]:
        """Batched beam search. A finished beam (EOS emitted) is carried on with one continuation, padding,
        at log-prob 0, so it competes with live beams on its final score and never duplicates."""
        tok = self.tokenizer
        b, dev = image_tokens.shape[0], image_tokens.device
        images = image_tokens.repeat_interleave(k, dim=0)  # [B*K, M, Cv], beam j of image i at i*K + j
        ids = torch.full((b * k, 1), tok.cls_id, dtype=torch.long, device=dev)
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # one live beam at the start: the others would duplicate it
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        lengths = torch.zeros(b * k, dtype=torch.long, device=dev)  # generated tokens, EOS included
        for _ in range(steps):
            logp = self._next_logprobs(ids, images)  # [B*K, V]
            finished = torch.full_like(logp, float("-inf"))
            finished[:, tok.pad_id] = 0.0
            logp = torch.where(done[:, None], finished, logp)
            cand = (scores.view(b * k, 1) + logp).view(b, -1)  # [B, K*V]
            scores, flat = cand.topk(k, dim=1)
            src = (flat // self.vocab_size + torch.arange(b, device=dev)[:, None] * k).view(-1)
            nxt = (flat % self.vocab_size).view(-1)
            ids = torch.cat([ids[src], nxt[:, None]], dim=1)
            was_done = done[src]
            lengths = lengths[src] + (~was_done).long()
            done = was_done | (nxt == tok.sep_id)
            if bool(done.all()):
                break
        final = scores.view(-1) / lengths.clamp_min(1).float() ** alpha if alpha else scores.view(-1)
        best = final.view(b, k).argmax(1) + torch.arange(b, device=dev) * k
        return [self._strip(row) for row in ids[best, 1:].tolist()]

    def _strip(self, row: list[int]) -> list[int]:
        """Generated ids up to (not including) the first EOS."""
        sep = self.tokenizer.sep_id
        return row[: row.index(sep)] if sep in row else row

    def sequence_logprob(self, image_tokens: torch.Tensor, generated: list[list[int]],
                         max_len: int | None = None) -> torch.Tensor:
        """Sum log-prob [B] of each caption that ``generate(image_tokens, max_len)`` returned, teacher-forced
        over the tokens generation may emit (what beam search maximises): its ids and then EOS, unless it
        stopped at the length limit."""
        tok, steps = self.tokenizer, self._steps(max_len)
        rows = [[tok.cls_id] + g + ([tok.sep_id] if len(g) < steps else []) for g in generated]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows], device=image_tokens.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=ids.device)
        with torch.no_grad():
            logits = self(ids, mask, image_tokens).float()
            logits[..., self.never_generated()] = float("-inf")  # the distribution generation draws from
            logp = F.log_softmax(logits, dim=-1)[:, :-1]
        picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        return picked.masked_fill(mask[:, 1:] == 0, 0.0).sum(1)  # padding targets (log-prob -inf) left out
