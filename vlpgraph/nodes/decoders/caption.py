"""Node kind ``decoder.caption``: a causal caption decoder that cross-attends to a vision tower's tokens
(vlpgraph.layers.decoder.CaptionTransformer), with the same WordPiece tokenizer an ``encoder.text`` would train."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vlpgraph.files.local import files_fingerprint
from vlpgraph.errors import UserError
from vlpgraph.layers.attention import resolve_backend
from vlpgraph.layers.decoder import CaptionTransformer
from vlpgraph.layers.tokenizer import WordPieceTokenizer, node_wordpiece
from vlpgraph.engine.ports import BuildContext, PairedData, VisionTower
from vlpgraph.engine.registry import In, Params, register

Backend = Literal["auto", "sdpa", "math", "xformers"]


class CaptionDecoderParams(Params):
    uni_depth: int = Field(1, ge=0, le=64, description="uni-modal layers: causal self-attention over the caption only")
    multi_depth: int = Field(1, ge=1, le=64, description="multimodal layers: causal self-attention, cross-attention "
                             "to the image tokens, MLP")
    width: int = Field(128, ge=8, le=4096, description="hidden size; divisible by heads")
    heads: int = Field(2, ge=1, le=64, description="attention heads per attention")
    mlp_ratio: float = Field(4.0, gt=0.0, le=16.0, description="MLP hidden width / hidden size")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on embeddings, residual branches and attention weights")
    max_len: int = Field(32, ge=3, le=4096, description="tokens per caption incl. [CLS] (BOS) and [SEP] (EOS); longer "
                         "ones are cut. A text tower in the same trial must have the same max_len (one tokenizer)")
    vocab_size: int = Field(2000, ge=32, le=1_000_000, description="vocabulary cap of the trained WordPiece (as "
                            "encoder.text's: equal values give the same tokenizer)")
    tokenizer: str | None = Field(
        None, description="local tokenizer.json to use, relative to the graph file's folder; none = train a "
        "WordPiece on the data's captions"
    )
    tie_embeddings: bool = Field(True, description="the output projection's weight is the token embedding")
    attention: Backend = Field("auto", description="attention backend: auto | sdpa | math | xformers")

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.width % self.heads:
            found.append(("width", f"width ({self.width}) must be divisible by heads ({self.heads})"))
        if self.tokenizer and "vocab_size" in self.model_fields_set:
            found.append(("vocab_size", f"vocab_size ({self.vocab_size}) caps the WordPiece trained on the data, "
                                        f"but tokenizer ({self.tokenizer}) is given: it would have no effect "
                                        "(leave one of them out)"))
        return found


def fingerprint(p: CaptionDecoderParams, base_dir) -> dict | None:
    """The sha256 of the ``tokenizer`` file it reads (None without one), as encoder.text's fingerprint: a
    file replaced at the same path is a new trial. A trained tokenizer needs none: the data's hash covers it."""
    return files_fingerprint({"tokenizer": p.tokenizer}, base_dir)


@register(
    "decoder.caption",
    params=CaptionDecoderParams,
    output=CaptionTransformer,
    inputs={
        "data": In(PairedData, doc="the tokenizer is trained on its training captions (as encoder.text's)"),
        "vision": In(VisionTower, doc="the tower whose tokens it cross-attends to (gives their width)"),
    },
    fingerprint=fingerprint,
)
def build(params: CaptionDecoderParams, inputs: dict, ctx: BuildContext) -> CaptionTransformer:
    """A causal caption decoder (CoCa's / MUG's text decoder) conditioned on image tokens.

    `uni_depth` pre-LN layers of causal self-attention + MLP over the caption, then `multi_depth`
    layers that add cross-attention to the image tokens (LayerNorm'd, keys/values projected from the
    vision tower's width); token embedding + learned positions (`max_len`), final LayerNorm, output
    projection tied to the token embedding (`tie_embeddings`). Attention runs through
    vlpgraph.layers.attention with the `attention` backend. Output: a CaptionDecoder,
    ``forward(input_ids, attention_mask, image_tokens) -> logits [B, L, vocab]`` (position t predicts
    token t+1 from tokens <= t and the image) and ``generate(image_tokens, max_len, beams)`` (greedy, or
    beam search with a length penalty; BOS = [CLS], EOS = [SEP]; no key/value cache: each step re-runs
    the prefix). It does not take the image tokens itself: objective.caption feeds it the full
    image's tokens (a captioner) or MAE's masked encoding (MUG).

    The tokenizer is built exactly as encoder.text builds it (a lowercase WordPiece of at most
    `vocab_size` trained on the data's training captions and cached by content hash, or a local
    `tokenizer` file), so a decoder and a text tower with the same `vocab_size` and `max_len` share one
    tokenizer; the trainer refuses a trial whose tokenizers differ. Deviations from MUG's reference:
    sizes scaled down (1 + 1 layers of width 128 by default) and trained from scratch.
    """
    if params.attention == "xformers":
        try:
            resolve_backend("xformers", ctx.device, torch.bfloat16)
        except UserError as e:
            raise UserError(f"node '{ctx.node}' (decoder.caption): {e}")
    hf_tok = node_wordpiece(params.tokenizer, inputs.get("data"), params.vocab_size, ctx,
                            f"node '{ctx.node}' (decoder.caption)")
    tokenizer = WordPieceTokenizer(hf_tok, params.max_len)
    decoder = CaptionTransformer(
        tokenizer, int(inputs["vision"].width), width=params.width, heads=params.heads, uni_depth=params.uni_depth,
        multi_depth=params.multi_depth, mlp_ratio=params.mlp_ratio, dropout=params.dropout,
        tie_embeddings=params.tie_embeddings, attention=params.attention,
    )
    return decoder.to(ctx.device)
