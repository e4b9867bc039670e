"""evaluator.documents: a document objective (objective.lcl) scored on held-out interleaved documents, and
a few of those documents stored as the model read them (images inline, ``<soi>`` positions marked)."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.nodes.evaluators.evaluation import evaluation_mode, to_device
from vlpgraph.layers.patches import png_bytes
from vlpgraph.engine.registry import In, Params, register


class DocumentsParams(Params):
    max_documents: int | None = Field(256, ge=1, description="score the first N held-out documents (None: all)")
    batch_size: int = Field(16, ge=1, description="documents per forward pass")
    num_samples: int = Field(8, ge=0, description="write this many held-out documents (the first ones) to the "
                             "store's samples table, for the app's Samples page")


def text_after_images(input_ids: torch.Tensor, soi_pos: torch.Tensor, image_row: torch.Tensor, tokenizer) -> list[torch.Tensor]:
    """For each kept image k: the positions of the text tokens that directly follow its block — from
    after its ``<eoi>`` up to (not including) the next ``<soi>``, ``[SEP]`` or padding. Each is a Long
    tensor of token positions (possibly empty: another image or the end follows at once)."""
    stop = {tokenizer.soi_id, tokenizer.sep_id, tokenizer.pad_id}
    ids = input_ids.tolist()
    out = []
    for row, soi in zip(image_row.tolist(), soi_pos.tolist()):
        seq = ids[row]
        q = soi + 1
        while q < len(seq) and seq[q] != tokenizer.eoi_id:
            q += 1
        first = q + 1
        q = first
        while q < len(seq) and seq[q] not in stop:
            q += 1
        out.append(torch.arange(first, q, dtype=torch.long))
    return out


def retrieval_top1(image: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> context, context -> image) top-1 hits [K] (bool) of L2-normalised features [K, D] whose
    row k is a positive pair; ties broken by the lower index, as ``argmax``."""
    sim = image @ context.T
    target = torch.arange(sim.shape[0])
    return sim.argmax(1) == target, sim.argmax(0) == target


def context_ranks(image: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of each image's own context among all contexts, by cosine [K]."""
    sim = image @ context.T
    own = sim.diagonal().unsqueeze(1)
    return (sim > own).sum(1) + 1


class DocumentsEvaluator(ports.Evaluator):
    """See :func:`build`."""

    headline = "perplexity"

    def __init__(self, params: DocumentsParams, data: ports.PairedData, objective: ports.DocumentModel):
        self.params = params
        self.data = data
        self.objective = objective

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p, obj = self.params, self.objective
        docs = self.data.test_documents
        if docs is None or not len(docs):
            raise UserError(f"evaluator.documents: the data has no held-out documents (test_documents); give it "
                            f"data with capability '{ports.INTERLEAVED}'")
        n = len(docs) if p.max_documents is None else min(len(docs), p.max_documents)
        tok = obj.tokenizer
        loss_sum, loss_n, after_sum, after_n = 0.0, 0, 0.0, 0
        images, contexts = [], []  # features of the images with context, in document order
        shown: list[dict] = []  # per stored document: what its row needs, filled after the ranks are known
        with evaluation_mode(model):
            for start in range(0, n, p.batch_size):
                items = [docs[i] for i in range(start, min(n, start + p.batch_size))]
                batch = to_device(self.data.collate(items), model.device)
                s = obj.score_documents(ports.Forward(batch))
                labels, token_loss = s.labels.cpu(), s.token_loss.float().cpu()
                scored = labels != -100
                loss_sum += float(token_loss[scored].sum())
                loss_n += int(scored.sum())
                image_row, soi_pos = s.image_row.cpu(), s.soi_pos.cpu()
                after = text_after_images(s.input_ids.cpu(), soi_pos, image_row, tok)
                for row, q in zip(image_row.tolist(), after):
                    if len(q):  # the loss of predicting token q sits at position q - 1
                        after_sum += float(token_loss[row, q - 1].sum())
                        after_n += len(q)
                ctx_mask = s.has_context.cpu()
                first_feature = sum(len(t) for t in images)
                images.append(s.image_features.float().cpu()[ctx_mask])
                contexts.append(s.context_features.float().cpu()[ctx_mask])
                if len(shown) < p.num_samples:
                    shown += self._pending(items, batch, s, after, token_loss, first_feature,
                                           p.num_samples - len(shown))
        image, context = torch.cat(images), torch.cat(contexts)
        metrics: dict[str, float] = {"documents": float(n), "context_images": float(len(image))}
        if obj.generates:
            gen = loss_sum / max(loss_n, 1)
            metrics |= {"gen_loss": gen, "perplexity": math.exp(min(gen, 50.0)),
                        "after_image_loss": after_sum / after_n if after_n else float("nan")}
        ranks = context_ranks(image, context) if len(image) else torch.zeros(0, dtype=torch.long)
        if obj.contrasts and len(image):
            i2c, c2i = retrieval_top1(image, context)
            metrics |= {"context_r1": 0.5 * float(i2c.float().mean() + c2i.float().mean()),
                        "context_chance": 1.0 / len(image)}
        rows = [self._row(d, ranks if obj.contrasts else None) for d in shown]
        return ports.EvalResult(metrics=metrics, samples=rows)

    def _pending(self, items: list[dict], batch: dict, s: ports.DocumentScores, after: list[torch.Tensor],
                 token_loss: torch.Tensor, first_feature: int, limit: int) -> list[dict]:
        """What the sample rows of this batch's first ``limit`` documents need (the ranks come later)."""
        out = []
        kept = s.kept.cpu().tolist()
        image_doc = batch["image_doc"].cpu().tolist()
        image_index = batch["image_index"].cpu().tolist()
        has_context = s.has_context.cpu().tolist()
        k_of = {}  # (doc row, image j) -> index among the kept images
        k = 0
        for i, keep in enumerate(kept):
            if keep:
                k_of[(image_doc[i], image_index[i])] = k
                k += 1
        feature_of, f = {}, first_feature  # kept image k -> its row among the features with context
        for kk, c in enumerate(has_context):
            if c:
                feature_of[kk] = f
                f += 1
        soi = s.soi_pos.cpu().tolist()
        n_tokens = (s.input_ids.cpu() != self.objective.tokenizer.pad_id).sum(1).tolist()
        for row, item in enumerate(items[:limit]):
            per_image = []
            for j in range(len(item["images"])):
                kk = k_of.get((row, j))
                entry = {"image": j, "kept": kk is not None}
                if kk is not None:
                    q = after[kk]
                    entry |= {"soi": soi[kk], "context": bool(has_context[kk]), "feature": feature_of.get(kk),
                              "after_image_loss": float(token_loss[row, q - 1].mean()) if len(q) else None}
                per_image.append(entry)
            out.append({"item": item, "images": per_image, "tokens": int(n_tokens[row])})
        return out

    def _row(self, d: dict, ranks: torch.Tensor | None) -> dict:
        item = d["item"]
        images = []
        for entry in d["images"]:
            e = {k: v for k, v in entry.items() if k != "feature"}
            if ranks is not None and entry.get("feature") is not None:
                e["context_rank"] = int(ranks[entry["feature"]])
            images.append(e)
        strip = self.data.denormalize(item["images"].float()).cpu()  # [M, 3, S, S] -> one row of tiles
        parts = []
        for kind, k in item["layout"]:
            parts.append(f"[image {k + 1}]" if kind == "image" else item["texts"][k])
        return {
            "kind": "document",
            "sample_id": int(item["sample_id"]),
            "text": " ".join(parts),
            "image": png_bytes(torch.cat(list(strip), dim=2)),
            "info": {"layout": [[kind, int(k)] for kind, k in item["layout"]], "texts": list(item["texts"]),
                     "images": images, "tile": int(strip.shape[-1]), "tokens": d["tokens"],
                     "truncated": not all(e["kept"] for e in images),
                     "context_pool": int(ranks.numel()) if ranks is not None else None},
        }


@register(
    "evaluator.documents",
    params=DocumentsParams,
    output=DocumentsEvaluator,
    inputs={
        "model": In(ports.Model, doc="the trained model"),
        "data": In(ports.PairedData, needs=frozenset({ports.INTERLEAVED}),
                   doc="interleaved data; its held-out documents (test_documents) are scored"),
        "objective": In(ports.DocumentModel, doc="the document objective to score (objective.lcl)"),
    },
)
def build(params: DocumentsParams, inputs: dict, ctx: ports.BuildContext) -> DocumentsEvaluator:
    """A document objective (objective.lcl) on held-out interleaved documents: what its two terms learned,
    measured where training never looked.

    Runs the objective's own pass (vision tower -> pooler -> sequences -> language model) in eval mode
    without gradients over the first `max_documents` of the data's ``test_documents`` (dataset.shapes:
    the test scenes grouped into documents with the training rules and their own random stream;
    dataset.interleaved: the held-out documents). Metrics, for the terms the objective trains
    (``generates`` / ``contrasts``; an untrained head's numbers are not reported):
    gen_loss (mean next-token cross-entropy over the targets the generation term scores), perplexity
    (exp of it), after_image_loss (the same over only the text tokens right after an image block — on
    the shapes documents, an image placed before its own sentence: how well the model captions from
    the image), context_r1 (top-1 retrieval between each image's feature and the ``<soi>`` context
    features, over all held-out images with context, mean of both directions) and context_chance
    (1 / that pool's size); documents and context_images (how many were scored).

    It writes the first `num_samples` documents to the samples table (kind 'document'): image (the
    document's images side by side, in document order, `tile` pixels each), text (the document in
    reading order with "[image k]" where image k stands), info {layout, texts, images: per image
    kept (False: truncation dropped it), soi (its ``<soi>`` position in the sequence), context (whether
    it enters the contrastive term), context_rank (its own context's rank among all held-out contexts,
    1 = retrieved first; only when the objective contrasts), after_image_loss}. Changes no weight.
    """
    return DocumentsEvaluator(params, inputs["data"], inputs["objective"])
