"""Node kind ``encoder.text``: a BERT text tower (transformers) with its WordPiece tokenizer; attention
goes through vlpgraph.layers.attention via a registered transformers attention function."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from transformers import BertConfig, BertModel

from vlpgraph.files.local import files_fingerprint, load_matching, read_state_dict, resolve_path
from vlpgraph.errors import UserError
from vlpgraph.layers.attention import resolve_backend, transformers_attention_name
from vlpgraph.layers.tokenizer import WordPieceTokenizer, node_wordpiece
from vlpgraph.engine.ports import BuildContext, PairedData, TextTower
from vlpgraph.engine.registry import In, Params, register

Backend = Literal["auto", "sdpa", "math", "xformers"]


class TextParams(Params):
    width: int = Field(128, ge=8, le=4096, description="hidden size; divisible by heads")
    depth: int = Field(4, ge=1, le=64, description="number of transformer layers")
    heads: int = Field(2, ge=1, le=64, description="attention heads per layer")
    mlp_ratio: float = Field(4.0, gt=0.0, le=16.0, description="feed-forward width / hidden size")
    max_len: int = Field(32, ge=3, le=4096, description="tokens per caption incl. [CLS] and [SEP]; longer ones are cut")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on hidden states and attention weights")
    attention: Backend = Field("auto", description="attention backend: auto | sdpa | math | xformers")
    tokenizer: str | None = Field(
        None, description="local tokenizer.json to use, relative to the graph file's folder; none = train a "
        "WordPiece on the data's captions"
    )
    vocab_size: int = Field(2000, ge=32, le=1_000_000, description="vocabulary cap of the trained WordPiece")
    pretrained: str | None = Field(
        None, description="local state dict (.safetensors or .pth/.pt) of a BERT to start from, relative to the "
        "graph file's folder; none = random init"
    )

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.width % self.heads:
            found.append(("width", f"width ({self.width}) must be divisible by heads ({self.heads})"))
        # model_fields_set: only a vocab_size written in the graph (the default is fine with a file)
        if self.tokenizer and "vocab_size" in self.model_fields_set:
            found.append(("vocab_size", f"vocab_size ({self.vocab_size}) caps the WordPiece trained on the data, "
                                        f"but tokenizer ({self.tokenizer}) is given: it would have no effect "
                                        "(leave one of them out)"))
        return found


def fingerprint(p: TextParams, base_dir) -> dict | None:
    """What the tower reads from disk: the sha256 of its ``tokenizer`` and ``pretrained`` files (None
    without either), so a file replaced at the same path is a new trial and the same file reached
    from another folder is the same trial. A trained tokenizer needs none: the data's hash covers it."""
    return files_fingerprint({"tokenizer": p.tokenizer, "pretrained": p.pretrained}, base_dir)


def facts(p: TextParams, base_dir) -> dict:
    """The tower's width, known from its params (encoder.fusion checks its heads against it)."""
    return {"width": p.width}


class BertTower(TextTower):
    """transformers ``BertModel`` (no pooler) as a TextTower; ``.bert`` is the model, ``.tokenizer``
    its tokenizer. ``attention_backend`` switches the attention backend in place."""

    def __init__(self, bert: BertModel, tokenizer: WordPieceTokenizer, backend: str):
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.width = bert.config.hidden_size
        self.max_len = tokenizer.max_len
        self._backend = backend

    @property
    def attention_backend(self) -> str:
        return self._backend

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        self.bert.set_attn_implementation(transformers_attention_name(backend))
        self._backend = backend

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same forward from input embeddings [B, L, width] instead of ids (mixer.cmc's mixed sentences).

        BERT's embeddings module adds the position and token-type embeddings, its LayerNorm and dropout to
        ``inputs_embeds`` exactly as it does to the word embeddings of ids, so
        ``forward_embeds(word_embeddings(ids), mask) == forward(ids, mask)``. L is at most ``max_len``."""
        out = self.bert(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


def build_bert(p: TextParams, tokenizer: WordPieceTokenizer) -> BertTower:
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=p.width,
        num_hidden_layers=p.depth,
        num_attention_heads=p.heads,
        intermediate_size=max(1, int(p.width * p.mlp_ratio)),
        hidden_act="gelu",
        hidden_dropout_prob=p.dropout,
        attention_probs_dropout_prob=p.dropout,
        max_position_embeddings=p.max_len,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_id,
        use_cache=False,
    )
    bert = BertModel._from_config(  # noqa: SLF001  transformers: the form that takes attn_implementation
        cfg, attn_implementation=transformers_attention_name(p.attention), add_pooling_layer=False
    )
    return BertTower(bert, tokenizer, p.attention)


def _load_pretrained(bert: BertModel, path: str, log) -> None:
    sd = read_state_dict(path, "encoder.text")
    for prefix in ("module.", "bert."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own = bert.state_dict()
    key = "embeddings.position_embeddings.weight"
    if key in sd and sd[key].shape[0] > own[key].shape[0] and sd[key].shape[1:] == own[key].shape[1:]:
        log(f"encoder.text: using the first {own[key].shape[0]} of {sd[key].shape[0]} position embeddings")
        sd[key] = sd[key][: own[key].shape[0]]
    word = "embeddings.word_embeddings.weight"
    if word in sd and sd[word].shape != own[word].shape:
        raise UserError(
            f"encoder.text: {path} has a vocabulary of {sd[word].shape[0]} but the tokenizer has "
            f"{own[word].shape[0]} (pass the checkpoint's tokenizer.json as 'tokenizer')"
        )
    load_matching(bert, sd, kind="encoder.text", path=path, what="the BERT", decided_by="width/depth/heads/max_len",
                  log=log)


@register(
    "encoder.text",
    params=TextParams,
    output=BertTower,
    inputs={"data": In(PairedData, doc="the tokenizer is trained on its training captions")},
    fingerprint=fingerprint,
    facts=facts,
)
def build(params: TextParams, inputs: dict, ctx: BuildContext) -> BertTower:
    """BERT text tower (transformers) with a WordPiece tokenizer, from scratch or from local files.

    Produces a TextTower: ``forward(input_ids, attention_mask)`` -> last hidden states
    [B, L, width], position 0 being [CLS]; padded positions are masked out of attention;
    ``forward_embeds(inputs_embeds, attention_mask)`` is the same forward from input embeddings (position
    and token-type embeddings added by BERT's embeddings module as for ids; mixer.cmc uses it).
    ``.tokenizer`` turns captions into ``{"input_ids", "attention_mask"}`` ([CLS] first, [SEP] last,
    cut at ``max_len``, padded to the batch's longest). Without ``tokenizer`` a lowercase WordPiece
    (vocab at most ``vocab_size``) is trained on the data's training captions and cached under
    ``<cache>/tokenizers/<content hash>.json``, so re-runs reuse it. Attention runs through
    vlpgraph.layers.attention with the ``attention`` backend. ``pretrained`` loads a local BERT state dict
    (keys as transformers' BertModel, optionally prefixed ``bert.``). Relative ``tokenizer`` and
    ``pretrained`` paths are relative to the graph file's folder; the files' content hashes are part
    of the node's hash. Never downloads.
    """
    if params.attention == "xformers":
        try:
            resolve_backend("xformers", ctx.device, torch.bfloat16)
        except UserError as e:
            raise UserError(f"node '{ctx.node}' (encoder.text): {e}")
    hf_tok = node_wordpiece(params.tokenizer, inputs.get("data"), params.vocab_size, ctx,
                            f"node '{ctx.node}' (encoder.text)")
    tokenizer = WordPieceTokenizer(hf_tok, params.max_len)
    tower = build_bert(params, tokenizer)
    if params.pretrained:
        _load_pretrained(tower.bert, str(resolve_path(params.pretrained, ctx.base_dir)), ctx.log)
    return tower
