"""Node kind ``encoder.lm``: a small causal decoder-only language model (transformers' Llama) over
interleaved image-text sequences, with a WordPiece tokenizer holding ``<soi> <img> <eoi>``; attention goes
through vlpgraph.layers.attention via a registered transformers attention function."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import LlamaConfig, LlamaModel

from vlpgraph.files.local import files_fingerprint, load_matching, read_state_dict, resolve_path
from vlpgraph.errors import UserError
from vlpgraph.layers.attention import resolve_backend, transformers_attention_name
from vlpgraph.layers.tokenizer import IMAGE_TOKENS, WordPieceTokenizer, node_wordpiece
from vlpgraph.engine.ports import BuildContext, LanguageModel, PairedData
from vlpgraph.engine.registry import In, Params, register

Backend = Literal["auto", "sdpa", "math", "xformers"]


class LMParams(Params):
    width: int = Field(128, ge=8, le=8192, description="hidden size; divisible by heads")
    depth: int = Field(2, ge=1, le=128, description="number of decoder layers")
    heads: int = Field(2, ge=1, le=128, description="attention heads per layer")
    mlp_ratio: float = Field(4.0, gt=0.0, le=16.0, description="feed-forward (SwiGLU) width / hidden size")
    max_len: int = Field(512, ge=8, le=65536, description="longest sequence (tokens incl. [CLS], image blocks "
                         "and [SEP]); longer documents are cut before the first image block that does not fit")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the attention weights")
    tie_embeddings: bool = Field(True, description="output projection = the input token embeddings (transposed)")
    attention: Backend = Field("auto", description="attention backend: auto | sdpa | math | xformers")
    tokenizer: str | None = Field(
        None, description="local tokenizer.json (WordPiece with [PAD] [CLS] [SEP] [MASK] <soi> <img> <eoi>), "
        "relative to the graph file's folder; none = train a WordPiece on the data's training captions"
    )
    vocab_size: int = Field(2000, ge=32, le=1_000_000, description="vocabulary cap of the trained WordPiece")
    pretrained: str | None = Field(
        None, description="local state dict (.safetensors or .pth/.pt) of a transformers LlamaModel (keys "
        "optionally prefixed 'model.'; 'lm_head.weight' when untied) to start from, relative to the graph "
        "file's folder; none = from scratch"
    )

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.width % self.heads:
            found.append(("width", f"width ({self.width}) must be divisible by heads ({self.heads})"))
        elif (self.width // self.heads) % 2:
            found.append(("heads", f"the head width (width/heads = {self.width // self.heads}) must be even "
                                   "(rotary position embeddings)"))
        if self.tokenizer and "vocab_size" in self.model_fields_set:
            found.append(("vocab_size", f"vocab_size ({self.vocab_size}) caps the WordPiece trained on the data, "
                                        f"but tokenizer ({self.tokenizer}) is given: it would have no effect "
                                        "(leave one of them out)"))
        return found


def fingerprint(p: LMParams, base_dir) -> dict | None:
    """The sha256 of the ``tokenizer`` and ``pretrained`` files it reads (None without either); a trained
    tokenizer needs none: the data's hash covers it."""
    return files_fingerprint({"tokenizer": p.tokenizer, "pretrained": p.pretrained}, base_dir)


def facts(p: LMParams, base_dir) -> dict:
    """The model's width and longest sequence, known from its params (an objective can check that an image
    block, ``n_visual + 2`` tokens after [CLS], fits in ``max_len``)."""
    return {"width": p.width, "max_len": p.max_len}


class LlamaLM(LanguageModel):
    """transformers ``LlamaModel`` as a :class:`vlpgraph.engine.ports.LanguageModel`; ``.model`` is the Llama,
    ``.lm_head`` the untied output projection (None when tied). ``attention_backend`` switches the
    attention backend in place."""

    def __init__(self, model: LlamaModel, tokenizer: WordPieceTokenizer, backend: str, tie_embeddings: bool):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.width = model.config.hidden_size
        self.max_len = model.config.max_position_embeddings
        self.lm_head = None
        if not tie_embeddings:
            self.lm_head = nn.Linear(self.width, model.config.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=model.config.initializer_range)
        self._backend = backend

    @property
    def attention_backend(self) -> str:
        return self._backend

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        self.model.set_attn_implementation(transformers_attention_name(backend))
        self._backend = backend

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # right padding (interleaved.build_sequences): the default positions 0..L-1 are each token's own
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)


def build_llama(p: LMParams, tokenizer: WordPieceTokenizer) -> LlamaLM:
    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=p.width,
        intermediate_size=max(1, int(p.width * p.mlp_ratio)),
        num_hidden_layers=p.depth,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        max_position_embeddings=p.max_len,
        attention_dropout=p.dropout,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.cls_id,
        eos_token_id=tokenizer.sep_id,
        tie_word_embeddings=p.tie_embeddings,
        use_cache=False,
    )
    model = LlamaModel._from_config(cfg, attn_implementation=transformers_attention_name(p.attention))  # noqa: SLF001  takes attn_implementation
    return LlamaLM(model, tokenizer, p.attention, p.tie_embeddings)


def _load_pretrained(lm: LlamaLM, path: str, log) -> None:
    sd = read_state_dict(path, "encoder.lm")
    head = sd.pop("lm_head.weight", None)
    if any(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    own = lm.model.state_dict()
    word = "embed_tokens.weight"
    if word in sd and sd[word].shape != own[word].shape:
        raise UserError(
            f"encoder.lm: {path} has a vocabulary of {sd[word].shape[0]} but the tokenizer has "
            f"{own[word].shape[0]} (pass the checkpoint's tokenizer.json as 'tokenizer')"
        )
    load_matching(lm.model, sd, kind="encoder.lm", path=path, what="the model", decided_by="width/depth/heads/mlp_ratio",
                  log=log)
    if lm.lm_head is not None:
        if head is None or head.shape != lm.lm_head.weight.shape:
            raise UserError(f"encoder.lm: {path} has no lm_head.weight of shape {tuple(lm.lm_head.weight.shape)} "
                            "(untied output projection; set tie_embeddings: true for a tied checkpoint)")
        lm.lm_head.weight.data.copy_(head)
    elif head is not None:
        log("encoder.lm: ignored the checkpoint's lm_head.weight (tie_embeddings: the output is the embeddings)")


@register(
    "encoder.lm",
    params=LMParams,
    output=LlamaLM,
    inputs={"data": In(PairedData, doc="the tokenizer is trained on its training captions (sentences)")},
    fingerprint=fingerprint,
    facts=facts,
)
def build(params: LMParams, inputs: dict, ctx: BuildContext) -> LlamaLM:
    """Causal decoder-only language model (transformers Llama) for interleaved image-text documents (LCL).

    Produces a LanguageModel: ``embed(input_ids)`` -> token embeddings [B, L, width];
    ``forward(inputs_embeds, attention_mask)`` -> hidden states [B, L, width] after the final norm,
    causal and with padded positions masked; ``logits(hidden)`` -> [B, L, vocab] (tied to the input
    embeddings unless ``tie_embeddings`` is false). Image placeholders are replaced by visual tokens
    between ``embed`` and ``forward`` (vlpgraph.layers.interleaved: build_sequences, place_visual).
    ``.tokenizer`` is a WordPiece with the specials ``<soi> <img> <eoi>`` (single vocabulary entries, never
    produced from text); without ``tokenizer`` it is trained on the data's training sentences (vocab at
    most ``vocab_size``) and cached by content hash. From scratch unless ``pretrained`` names a local
    LlamaModel state dict; the files' content hashes are part of the node's hash. Never downloads.

    Deviates from the reference (OpenGVLab/LCL, a pretrained LLM): small and from scratch by default;
    Llama's final norm is RMSNorm, not LayerNorm; positions are rotary. Attention runs through
    vlpgraph.layers.attention with the ``attention`` backend.
    """
    if params.attention == "xformers":
        try:
            resolve_backend("xformers", ctx.device, torch.bfloat16)
        except UserError as e:
            raise UserError(f"node '{ctx.node}' (encoder.lm): {e}")
    hf_tok = node_wordpiece(params.tokenizer, inputs.get("data"), params.vocab_size, ctx,
                            f"node '{ctx.node}' (encoder.lm)", extra_specials=IMAGE_TOKENS)
    try:
        tokenizer = WordPieceTokenizer(hf_tok, params.max_len, extra_specials=IMAGE_TOKENS)
    except UserError as e:
        raise UserError(f"node '{ctx.node}' (encoder.lm): {e}")
    lm = build_llama(params, tokenizer)
    if params.pretrained:
        _load_pretrained(lm, str(resolve_path(params.pretrained, ctx.base_dir)), ctx.log)
    return lm
