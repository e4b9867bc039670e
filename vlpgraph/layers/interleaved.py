"""Interleaved image-text documents as language-model sequences (LCL, encoder.lm).

A document is a list of sentences and images in reading order. :func:`build_sequences` turns a batch of
them into token ids in which every image is a block ``<soi> <img>×n <eoi>``; :func:`place_visual`
replaces the ``<img>`` placeholders' embeddings by the image's visual tokens. The layout of a batch is
the one the interleaved data's ``collate`` produces (see the contract in vlpgraph.engine.ports, PairedData with
capability ``interleaved``): ``doc_texts``, ``doc_layout``, ``image_doc``, ``image_index``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100  # label of a position whose next token is not predicted (torch's cross_entropy ignore_index)


@dataclass
class Sequences:
    """A batch of documents as token sequences (CPU tensors; move them to the model's device).

    ``input_ids``, ``attention_mask``, ``labels``: Long[B, L] (L = the longest sequence of the batch, at
    most ``max_len``; right-padded with the tokenizer's ``pad_id``, mask 0 there). ``kept``: Bool[sum M],
    one per image of the batch (in the batch's image order), False for the images truncation dropped.
    ``image_row``, ``image_start``, ``soi_pos``: Long[K], one per kept image in the batch's image order
    (so ``visual[kept]`` lines up with them): the batch row, the position of the first ``<img>``, and the
    position of the ``<soi>`` (``image_start - 1``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    kept: torch.Tensor
    image_row: torch.Tensor
    image_start: torch.Tensor
    soi_pos: torch.Tensor


def build_sequences(
    doc_texts: Sequence[Sequence[str]],
    doc_layout: Sequence[Sequence[tuple[str, int]]],
    image_doc: torch.Tensor,
    image_index: torch.Tensor,
    tokenizer,
    n_visual: int,
    max_len: int,
) -> Sequences:
    """Token sequences for a batch of interleaved documents.

    Each document becomes ``[CLS] … [SEP]``: a ``("text", k)`` entry of its layout contributes the
    WordPiece ids of ``doc_texts[b][k]`` (``tokenizer.pieces``: no [CLS]/[SEP] of its own), an
    ``("image", j)`` entry the block ``<soi> <img>×n_visual <eoi>`` (ids ``tokenizer.soi_id``,
    ``img_id``, ``eoi_id``). ``image_doc`` / ``image_index`` (Long[sum M]) say which document row and
    which image ``j`` of it each image of the batch is.

    Truncation to ``max_len`` never cuts an image block: when a block would not fit whole, the
    sequence ends before its ``<soi>`` (that image and everything after it are dropped, ``kept`` False);
    otherwise text is cut at ``max_len``. ``[SEP]`` (end of document) is appended only to a document
    that fits whole: a truncated document did not end there, so the model is not taught that it did.

    Labels are already shifted: ``labels[b, t]`` is the token at ``t + 1`` — the target of the model's
    output at position ``t`` — so the generation loss is ``cross_entropy(logits.flatten(0, 1),
    labels.flatten(), ignore_index=-100)`` with no further shift (do not hand them to a transformers
    ``*ForCausalLM``, which shifts again). ``labels[b, t]`` is -100 where that target is an ``<img>``
    placeholder, an ``<eoi>`` or padding, and at the last position of each sequence (nothing follows);
    so the loss covers next-token prediction of text tokens, ``<soi>`` and ``[SEP]``.

    Raises ValueError when ``max_len < n_visual + 3`` (no image could ever fit).
    """
    if max_len < n_visual + 3:
        raise ValueError(f"max_len ({max_len}) cannot hold even one image block after [CLS] "
                         f"(needs at least n_visual + 3 = {n_visual + 3})")
    soi, img, eoi = tokenizer.soi_id, tokenizer.img_id, tokenizer.eoi_id
    block = [soi] + [img] * n_visual + [eoi]
    # the batch position of image j of document b
    where = {(int(b), int(j)): i for i, (b, j) in enumerate(zip(image_doc.tolist(), image_index.tolist()))}
    kept = torch.zeros(len(where), dtype=torch.bool)
    rows, starts = [], []  # per kept image, indexed by its batch position
    seqs: list[list[int]] = []
    for b, (texts, layout) in enumerate(zip(doc_texts, doc_layout)):
        pieces = tokenizer.pieces(list(texts)) if texts else []
        ids = [tokenizer.cls_id]
        complete = True
        for what, k in layout:
            if what == "text":
                room = max_len - len(ids)
                ids += pieces[k][:room]
                if len(pieces[k]) > room:
                    complete = False
                    break
            elif what == "image":
                if len(ids) + len(block) > max_len:  # would not fit whole: cut at its <soi>
                    complete = False
                    break
                i = where[(b, int(k))]
                kept[i] = True
                rows.append((i, b))
                starts.append((i, len(ids) + 1))
                ids += block
            else:
                raise ValueError(f"document {b}: unknown layout entry {what!r} (expected 'text' or 'image')")
        if complete:
            if len(ids) < max_len:
                ids.append(tokenizer.sep_id)
            else:  # the document fits only without its [SEP]: it is cut after its last token
                complete = False
        seqs.append(ids)

    B, L = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, L), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, : len(s)] = 1
    target = input_ids[:, 1:]
    no_loss = (target == img) | (target == eoi) | (attention_mask[:, 1:] == 0)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = target.masked_fill(no_loss, IGNORE)

    order = sorted(rows)  # batch image order
    image_row = torch.tensor([b for _, b in order], dtype=torch.long)
    image_start = torch.tensor([s for _, s in sorted(starts)], dtype=torch.long)
    return Sequences(input_ids, attention_mask, labels, kept, image_row, image_start, image_start - 1)


def place_visual(embeds: torch.Tensor, visual: torch.Tensor, image_row: torch.Tensor,
                 image_start: torch.Tensor) -> torch.Tensor:
    """``embeds`` [B, L, C] with kept image k's visual tokens ``visual[k]`` ([K, n, C]) written at
    positions ``image_start[k] … image_start[k] + n - 1`` of row ``image_row[k]`` (its ``<img>`` slots);
    every other position unchanged. Out of place; gradients flow to both ``embeds`` (the positions kept)
    and ``visual``."""
    K, n, C = visual.shape
    if K == 0:
        return embeds
    cols = image_start.to(embeds.device)[:, None] + torch.arange(n, device=embeds.device)  # [K, n]
    rows = image_row.to(embeds.device)[:, None].expand(K, n)
    return embeds.index_put((rows.reshape(-1), cols.reshape(-1)), visual.reshape(K * n, C).to(embeds.dtype))
