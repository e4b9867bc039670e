"""Helpers every evaluator shares: eval mode, batching a split, tokenising, embedding, ranking.

Evaluator node modules may not import each other, so their common code lives here. Everything works
through the port interfaces (``ports.Model``, ``ports.PairedData``, ``ports.Embedder``) only.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A copy of ``batch`` with every tensor (and every tensor in a list, e.g. ragged boxes) on ``device``."""

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [t.to(device, non_blocking=True) for t in v]
        return v

    return {k: move(v) for k, v in batch.items()}


def tokenize(
    tokenizer: ports.Tokenizer | None, texts: Sequence[str], who: str = "evaluator"
) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` for ``texts``; a clear error when the model has no tokenizer."""
    if tokenizer is None:
        raise TrialFailed(f"{who}: the model has no tokenizer (it needs a text tower to embed captions)")
    out = tokenizer(list(texts))
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def _roots(model: ports.Model) -> list[nn.Module]:
    roots: list[nn.Module] = []
    modules = getattr(model, "modules", None)
    if isinstance(modules, nn.Module):
        roots.append(modules)
    for obj in (getattr(model, "objectives", None) or {}).values():
        if isinstance(obj, nn.Module):
            roots.append(obj)
    return roots


@contextmanager
def evaluation_mode(model: ports.Model, *also: nn.Module) -> Iterator[None]:
    """Every module of ``model`` (its modules and objectives), and the modules in ``also`` (an evaluated
    objective or tower another trainer trained), in eval mode under ``torch.no_grad``; each submodule's
    own train/eval flag is restored afterwards, even on error.

    ``no_grad`` rather than ``inference_mode``: evaluators also run mid-training, and a tensor a module
    caches lazily during evaluation (position tables, masks) must stay usable by autograd afterwards.
    """
    with frozen(*_roots(model), *also):
        yield


@contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """``modules`` (None ones skipped) in eval mode under ``no_grad``; each submodule's own train flag
    restored afterwards, even on error. What :func:`evaluation_mode` does for a model's modules."""
    flags = {m: m.training for root in modules if root is not None for m in root.modules()}
    for m in flags:
        m.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was_training in flags.items():
            m.training = was_training


@dataclass
class SplitEmbeddings:
    """Embeddings of some items of a split, in the order of ``indices``. images/texts: [N, D] fp32 on CPU
    (None when not asked for); captions and sample_ids: one per item."""

    indices: list[int]
    images: torch.Tensor | None = None
    texts: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)


def embed_split(
    model: ports.Model,
    data: ports.PairedData,
    dataset: torch.utils.data.Dataset,
    indices: Sequence[int] | None = None,
    *,
    batch_size: int = 256,
    images: bool = True,
    texts: bool = True,
    who: str = "evaluator",
) -> SplitEmbeddings:
    """Embed ``dataset[i]`` for ``i`` in ``indices`` (default: all) with ``model.embedder()``, in batches.

    Each batch is ``data.collate(items)`` (+ the tokenizer's ids when ``texts``), moved to
    ``model.device`` and wrapped in a ``ports.Forward``; runs in :func:`evaluation_mode`.
    """
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    embedder = model.embedder()
    out = SplitEmbeddings(indices=idx)
    image_chunks: list[torch.Tensor] = []
    text_chunks: list[torch.Tensor] = []
    with evaluation_mode(model):
        for start in range(0, len(idx), batch_size):
            batch = data.collate([dataset[i] for i in idx[start : start + batch_size]])
            captions = list(batch.get("captions", []))
            if texts:
                batch.update(tokenize(model.tokenizer, captions, who))
            fwd = ports.Forward(to_device(batch, model.device))
            if images:
                image_chunks.append(embedder.embed_images(fwd).float().cpu())
            if texts:
                text_chunks.append(embedder.embed_texts(fwd).float().cpu())
            out.captions.extend(captions)
            ids = batch.get("sample_ids")
            if ids is not None:
                out.sample_ids.extend(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))
    if images:
        out.images = torch.cat(image_chunks) if image_chunks else torch.empty(0, 0)
    if texts:
        out.texts = torch.cat(text_chunks) if text_chunks else torch.empty(0, 0)
    return out


def embed_texts(
    model: ports.Model, texts: Sequence[str], *, batch_size: int = 256, who: str = "evaluator"
) -> torch.Tensor:
    """Embed free texts (e.g. class prompts): [len(texts), D] fp32 on CPU. The Forward holds only ids."""
    embedder = model.embedder()
    chunks: list[torch.Tensor] = []
    with evaluation_mode(model):
        for start in range(0, len(texts), batch_size):
            batch = tokenize(model.tokenizer, texts[start : start + batch_size], who)
            fwd = ports.Forward(to_device(batch, model.device))
            chunks.append(embedder.embed_texts(fwd).float().cpu())
    return torch.cat(chunks)


def first_hit_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_keys: torch.Tensor,
    gallery_keys: torch.Tensor,
    *,
    chunk: int = 1024,
) -> torch.Tensor:
    """For each query, the 0-based rank of its best-scoring relevant gallery item: Long[Q].

    queries [Q, D], gallery [G, D]; score = dot product. Gallery item g is relevant to query q when
    ``query_keys[q] == gallery_keys[g]``. The rank counts the irrelevant items scoring at least as
    high as the best relevant one, so ties count against the query (a collapsed model that gives
    every item the same embedding scores 0, not 1) and a NaN score never counts as a hit. A query
    with no relevant item gets rank = number of irrelevant items (a miss at any k < G).
    """
    ranks = []
    for s in range(0, queries.shape[0], chunk):
        scores = (queries[s : s + chunk] @ gallery.T).nan_to_num(nan=float("-inf"))
        relevant = query_keys[s : s + chunk, None] == gallery_keys[None, :]
        best = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((scores >= best) & ~relevant).sum(dim=1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose first hit is within the top k, for each k."""
    if ranks.numel() == 0:
        return {k: float("nan") for k in ks}
    return {k: (ranks < k).float().mean().item() for k in ks}


# ------------------------------------------------------------------------------- frozen transfer


@dataclass
class FrozenTokens:
    """A frozen vision tower's output on some items of a split, computed once per evaluation.

    tokens: [N, prefix + P, C] fp32 on CPU (final norm applied, CLS first); labels: Long[N] (the items'
    ``label``, -1 where an item has none or the data has no labels); captions, sample_ids: one per item.
    """

    indices: list[int]
    tokens: torch.Tensor
    labels: torch.Tensor
    captions: list[str] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer of ``module`` (names, dtypes, shapes, bytes): what a cache of
    the module's outputs must be keyed by, so it can never serve features of other weights."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _token_cache(encoder: nn.Module, dataset, device, batch_size: int) -> dict[int, tuple]:
    """The chunks of ``dataset`` already encoded by ``encoder`` with its current weights: {chunk: (tokens,
    labels, captions, sample_ids)}. Kept on the encoder object (so it lives as long as the trial's model);
    dropped as soon as the weights differ from those it was computed with (the next mid-training
    evaluation, say)."""
    digest = weights_digest(encoder)
    state = encoder.__dict__.get("_vlpgraph_frozen_tokens")
    if state is None or state["digest"] != digest:
        state = {"digest": digest, "splits": {}}
        encoder.__dict__["_vlpgraph_frozen_tokens"] = state
    # id(dataset) is stable while the trial's model holds its data, and the digest changes with the trial
    return state["splits"].setdefault((id(dataset), len(dataset), str(device), int(batch_size)), {})


def frozen_image_tokens(
    encoder: ports.VisionTower,
    data: ports.PairedData,
    dataset: torch.utils.data.Dataset,
    indices: Sequence[int] | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> FrozenTokens:
    """``encoder``'s tokens of ``dataset[i]`` for ``i`` in ``indices`` (default: all), in eval mode under
    ``no_grad`` (its own train flags restored afterwards): the features every frozen-transfer head trains
    on. The encoder's weights are only read.

    Computed once per evaluation, whichever evaluators ask: the split is encoded in fixed chunks
    (items ``k*batch_size .. (k+1)*batch_size - 1``), each chunk the first time an item of it is asked for,
    and kept for as long as the encoder's weights are the same (:func:`weights_digest`). Because a
    chunk is always the same batch, an item's features are bitwise the same whichever evaluator, subset
    or order asked first."""
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    n = len(dataset)
    cache = _token_cache(encoder, dataset, device, batch_size)
    missing = sorted({i // batch_size for i in idx} - set(cache))
    if missing:
        flags = {m: m.training for m in encoder.modules()}
        encoder.eval()
        try:
            with torch.no_grad():
                for chunk in missing:
                    items = [dataset[i] for i in range(chunk * batch_size, min(n, (chunk + 1) * batch_size))]
                    batch = data.collate(items)
                    ids = batch.get("sample_ids")
                    cache[chunk] = (
                        encoder(batch["images"].to(device)).float().cpu(),
                        [int(it.get("label", -1)) for it in items],
                        list(batch.get("captions", [])),
                        [] if ids is None else (ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)),
                    )
        finally:
            for m, was_training in flags.items():
                m.training = was_training
    out = FrozenTokens(indices=idx, tokens=torch.empty(0), labels=torch.empty(0, dtype=torch.long))
    rows, labels = [], []
    for i in idx:
        tokens, chunk_labels, captions, sample_ids = cache[i // batch_size]
        j = i % batch_size
        rows.append(tokens[j])
        labels.append(chunk_labels[j])
        if captions:
            out.captions.append(captions[j])
        if sample_ids:
            out.sample_ids.append(sample_ids[j])
    out.tokens = torch.stack(rows) if rows else torch.empty(0)
    out.labels = torch.tensor(labels, dtype=torch.long)
    return out


@contextmanager
def seeded(ctx: ports.BuildContext) -> Iterator[torch.Generator]:
    """A light head's random draws, a pure function of (trial seed, evaluator node): the global torch RNG
    is forked (what training draws next is untouched, evaluation mid-training included) and seeded from
    them; also yields a CPU generator with the same seed for samplers and shuffles."""
    from vlpgraph.engine.compile import node_seed

    seed = node_seed(ctx.seed, ctx.node)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def tokenizer_for(model: ports.Model, data: ports.PairedData, ctx: ports.BuildContext, vocab_size: int = 2000,
                  max_len: int = 32) -> ports.Tokenizer:
    """The model's tokenizer when it has one, else a WordPiece trained on the data's training captions
    (cached under the store's cache by content hash), for heads that read text of a model without a text
    tower (an MAE's transfer retrieval or captioning)."""
    if model.tokenizer is not None:
        return model.tokenizer
    from vlpgraph.layers.tokenizer import WordPieceTokenizer, cached_wordpiece

    hf_tok, _ = cached_wordpiece(list(data.train_captions()), vocab_size, ctx.cache_root, ctx.log)
    return WordPieceTokenizer(hf_tok, max_len)


# ------------------------------------------------------- frozen-transfer heads and recall@k checks


def split_labels(split: torch.utils.data.Dataset) -> torch.Tensor:
    """Long[len(split)]: each item's ``label`` (-1 where it has none). Data with capability ``labels``
    lists them as ``split.labels`` (read without decoding an image); otherwise every item is read."""
    labels = getattr(split, "labels", None)
    if labels is None:
        labels = [int(split[i].get("label", -1)) for i in range(len(split))]
    return torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)


def minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches into ``range(n)``: epochs of a random permutation (drawn from
    ``generator``), each cut into batches of ``min(batch_size, n)``; an epoch's short tail is skipped
    (every batch has the same size, so a batch statistic never rests on a handful of items)."""
    size = min(batch_size, n)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            if done == steps:
                return
            yield perm[start : start + size]
            done += 1


def recall_ks_too_large(ks: Sequence[int], n: int) -> list[int]:
    """The ks that make no sense on n pairs: R@k is 1 for any model once k >= n."""
    return [k for k in ks if k >= n]


def recall_ks_degenerate(ks: Sequence[int], n: int) -> list[int]:
    """The ks whose recall says little on n pairs: from k >= n/2 on, a random ranking scores >= 0.5."""
    return [k for k in ks if 2 * k >= n]


def recall_ks_refusal(bad: Sequence[int], searched: str) -> str:
    """The message refusing ``bad`` ks on a test split of ``searched`` (e.g. '64 samples')."""
    return (f"ks {list(bad)} reach the size of the test split searched ({searched}): R@k is 1 for any model once "
            f"k >= the number of pairs (use smaller ks, or a larger test split)")
