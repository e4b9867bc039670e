"""evaluator.linear_probe: a linear classifier on a frozen vision encoder's features (top-1/top-5)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.nodes.evaluators.evaluation import (FrozenTokens, first_hit_ranks, frozen_image_tokens, minibatches,
                                 recall_at, seeded, split_labels)
from vlpgraph.layers.pooling import AttentivePool
from vlpgraph.engine.registry import In, Params, register


class LinearProbeParams(Params):
    pool: Literal["cls", "mean", "attentive"] = Field(
        "attentive", description="image feature: the CLS token, the mean of the patch tokens (prefix excluded), or a "
        "learned single-query attention pool over the patch tokens, trained with the classifier")
    pool_heads: int = Field(4, ge=1, le=64, description="attention heads of the attentive pool (divides the "
                            "encoder's width)")
    batchnorm: bool = Field(True, description="a BatchNorm without affine parameters before the classifier, as "
                            "MAE's linear probe (features of every method on one scale, so one lr fits all)")
    steps: int = Field(200, ge=1, description="optimiser steps of the head (the fixed budget, same for every method)")
    batch_size: int = Field(128, ge=2, description="training items per step (at most the labelled training items)")
    lr: float = Field(1e-2, gt=0, description="peak AdamW learning rate (cosine decay to 0 over `steps`)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (MAE's linear probe uses none)")
    feature_batch_size: int = Field(256, ge=1, description="images per forward pass of the frozen encoder")
    max_train_samples: int | None = Field(
        None, ge=2, description="train on the labelled items among the first N training samples only (None: all). "
        "The frozen tokens are held in memory (N x tokens x width x 4 bytes): cap N for large data")


class ProbeHead(nn.Module):
    """Frozen tokens [B, prefix + P, C] -> class logits [B, K]: pool, optional BatchNorm, linear."""

    def __init__(self, p: LinearProbeParams, width: int, prefix: int, num_classes: int):
        super().__init__()
        self.how, self.prefix = p.pool, prefix
        self.pool = AttentivePool(width, p.pool_heads) if p.pool == "attentive" else None
        dim = self.pool.out_dim if self.pool is not None else width
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if p.batchnorm else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)  # MAE's probe init
        nn.init.zeros_(self.linear.bias)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.how == "cls":
            return tokens[:, 0]
        patches = tokens[:, self.prefix:]
        return patches.mean(1) if self.how == "mean" else self.pool(patches)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.features(tokens)))


class LinearProbe(ports.Evaluator):
    """Trains a probe on the frozen encoder's features of the labelled training items; see :func:`build`."""

    headline = "top1"

    def __init__(self, params: LinearProbeParams, data: ports.PairedData, encoder: ports.VisionTower):
        self.params = params
        self.data = data
        self.encoder = encoder

    def _features(self, split, device, limit: int | None = None) -> FrozenTokens:
        """The frozen tokens of ``split``'s labelled items (label >= 0), among its first ``limit`` items."""
        labels = split_labels(split)[:limit]
        idx = torch.nonzero(labels >= 0).flatten().tolist()
        return frozen_image_tokens(self.encoder, self.data, split, idx, device=device,
                                   batch_size=self.params.feature_batch_size)

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p, who = self.params, f"node '{ctx.node}' (evaluator.linear_probe)"
        device = model.device
        train = self._features(self.data.paired_train(), device, p.max_train_samples)
        test = self._features(self.data.test, device)
        names = list(getattr(self.data, "class_names", None) or [])
        seen = train.labels.unique()
        labelled = torch.cat([train.labels, test.labels])
        num_classes = max(len(names), int(labelled.max()) + 1 if len(labelled) else 0)
        if len(seen) < 2:
            raise TrialFailed(f"{who}: {len(train.labels)} labelled training items in {len(seen)} class(es); a "
                              "classifier needs at least 2 classes")
        if len(test.labels) == 0:
            raise TrialFailed(f"{who}: the test split has no labelled items to classify")
        ctx.log(f"{ctx.node}: linear probe ({p.pool}) on {len(train.labels)} labelled training items, "
                f"{len(test.labels)} test items, {num_classes} classes (chance top1 {1 / num_classes:.3f})")

        with seeded(ctx) as gen:
            head = ProbeHead(p, int(self.encoder.width), int(self.encoder.num_prefix_tokens), num_classes).to(device)
            opt = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.steps)
            x, y = train.tokens.to(device), train.labels.to(device)
            head.train()
            with torch.enable_grad():  # evaluators may run inside no_grad; the head trains
                for batch in minibatches(len(y), p.batch_size, p.steps, gen):
                    batch = batch.to(device)
                    loss = F.cross_entropy(head(x[batch]), y[batch])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            head.eval()
            with torch.no_grad():
                logits = torch.cat([head(test.tokens[s : s + 1024].to(device)).float().cpu()
                                    for s in range(0, len(test.labels), 1024)])
        # first_hit_ranks against the identity gallery: score = logit; ties count against the probe
        ranks = first_hit_ranks(logits, torch.eye(num_classes), test.labels, torch.arange(num_classes))
        ks = [1, 5] if num_classes >= 5 else [1]
        return ports.EvalResult(metrics={f"top{k}": v for k, v in recall_at(ranks, ks).items()})


@register(
    "evaluator.linear_probe",
    params=LinearProbeParams,
    output=LinearProbe,
    inputs={
        "model": In(ports.Model, doc="the trained model (evaluated after, or during, its training)"),
        "data": In(ports.PairedData, needs=frozenset({ports.LABELS}),
                   doc="data with class labels (dataset.shapes; dataset.captions with label_column)"),
        "encoder": In(ports.VisionTower, doc="the vision tower whose frozen features are probed"),
    },
)
def build(params: LinearProbeParams, inputs: dict, ctx: ports.BuildContext) -> LinearProbe:
    """Linear probe on the frozen vision encoder: top1 / top5 accuracy on the test split's labelled items.

    The encoder runs once per evaluation, in eval mode under no_grad, over the labelled items of the
    train and test splits (items with ``label`` -1 are left out; data needs capability ``labels``). The
    feature is its CLS token (``pool: cls``), the mean of its patch tokens (``mean``; CLS and any other
    prefix token excluded), or a learned single-query attention pool over the patch tokens
    (``attentive``, ``pool_heads`` heads, ``layers.pooling.AttentivePool``), trained with the classifier.
    Then an affine-free BatchNorm (``batchnorm``, as MAE's probe) and a linear classifier, trained with
    cross-entropy for exactly ``steps`` AdamW steps of ``batch_size`` items (cosine decay from ``lr``),
    from the evaluator's own seed (trial seed, node). The head never sees the encoder, so the encoder's
    weights stay bit-identical. ``attentive`` is the default because methods train the CLS token very
    differently (ITC directly, MAE hardly at all): a pool that reads the patches judges the encoder, not
    where a method put its summary (LCL drops CLS for an attentive pooler for the same reason).

    The budget is the same for every method: these params alone decide how the head trains (nothing
    is read from the model or its trainer), so variants judged by one evaluator node get one budget.
    Deviation from MAE's protocol (LARS, batch 16384, 90 epochs, SGD-like schedule): a fixed small
    step budget with AdamW, whose per-parameter step size keeps one lr right for features of any scale
    (the attentive pool's projections are not normalised by the BatchNorm). Metrics: top1, top5 (with
    at least 5 classes); ties count against the probe. The item counts and chance level are logged.
    Fails the trial with a clear message when the labelled training items span fewer than 2 classes or
    the test split has no labelled item.
    """
    encoder = inputs["encoder"]
    if params.pool == "attentive" and int(encoder.width) % params.pool_heads:
        raise UserError(f"node '{ctx.node}' (evaluator.linear_probe): pool_heads {params.pool_heads} does not "
                        f"divide the encoder's width {int(encoder.width)}")
    return LinearProbe(params, inputs["data"], encoder)
