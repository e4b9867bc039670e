"""objective.itc: image-text contrastive loss (CLIP / ALBEF ITC) and the shared image-text embedding.

Also home of :func:`contrastive_loss`, the symmetric InfoNCE that mixers reuse with soft targets; the
cross-rank feature gather it uses under ``torchrun`` (:func:`gather_with_grad`) is in
:mod:`vlpgraph.layers.distributed`.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.layers.distributed import gather_with_grad, world
from vlpgraph.layers.temperature import LearnedTemperature, check_temperature_range
from vlpgraph.engine.registry import In, Params, register

# ------------------------------------------------------------------------------------ the loss


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    temperature: torch.Tensor | float,
    targets: torch.Tensor | None = None,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired image and text embeddings.

    image_emb, text_emb: [B, D], L2-normalised; row i of each is pair i.
    temperature: τ (float or 0-d tensor); logits = cosine similarity / τ. A CLIP ``logit_scale`` s is
        τ = 1/s: pass ``1 / s``.
    targets: optional soft targets [B, B], row i a distribution over the batch's texts for image i
        (rows sum to 1). Image->text uses ``targets``, text->image uses ``targets.T``. None means
        one-hot (image i <-> text i), i.e. plain cross-entropy with labels ``arange(B)``. Targets are
        constants: no gradient flows into them.
    gather: under ``torch.distributed`` with world size > 1, gather both modalities from every rank
        with gradient and score the local rows against the global columns (OpenCLIP's ``local_loss``):
        labels are offset by ``rank*B`` and soft targets are placed in this rank's block of columns
        (zero elsewhere). Set False to keep the loss within the local batch.

    Returns the scalar ½·(CE(image->text) + CE(text->image)), averaged over the local rows, in fp32.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"contrastive_loss: image_emb {tuple(image_emb.shape)} and text_emb "
                         f"{tuple(text_emb.shape)} must both be [B, D]")
    b = image_emb.shape[0]
    rank, size = world() if gather else (0, 1)
    all_images, all_texts = image_emb, text_emb
    if size > 1:
        all_images, all_texts = gather_with_grad(image_emb), gather_with_grad(text_emb)

    # fp32 logits: under bf16 autocast the matmul runs in bf16, the softmax should not
    logits_i2t = (image_emb @ all_texts.T).float() / temperature  # [B, world*B]
    logits_t2i = (text_emb @ all_images.T).float() / temperature
    offset = rank * b

    if targets is None:
        labels = torch.arange(b, device=image_emb.device) + offset
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))

    if targets.shape != (b, b):
        raise ValueError(f"contrastive_loss: targets must be [B, B] = [{b}, {b}], got {tuple(targets.shape)}")
    targets = targets.detach().float()
    targets_i2t, targets_t2i = targets, targets.T
    if size > 1:
        targets_i2t = F.pad(targets_i2t, (offset, (size - 1) * b - offset))
        targets_t2i = F.pad(targets_t2i, (offset, (size - 1) * b - offset))
    return 0.5 * (F.cross_entropy(logits_i2t, targets_i2t) + F.cross_entropy(logits_t2i, targets_t2i))


@torch.no_grad()
def concat_all_gather(features: torch.Tensor) -> torch.Tensor:
    """[B, D] on every rank -> [world*B, D] without gradient (ALBEF's ``concat_all_gather``).

    Returns ``features`` unchanged when not distributed."""
    _, size = world()
    if size == 1:
        return features
    out = [torch.empty_like(features) for _ in range(size)]
    dist.all_gather(out, features.contiguous())
    return torch.cat(out, dim=0)


def queued_contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    all_images: torch.Tensor,
    all_texts: torch.Tensor,
    temperature: torch.Tensor | float,
    targets_i2t: torch.Tensor,
    targets_t2i: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE against columns beyond the batch (ALBEF's momentum / queue ITC).

    image_emb, text_emb: [B, D], L2-normalised, the local rows.
    all_images, all_texts: [K, D] with K >= B: the columns (keys) each modality is scored against;
        ALBEF passes the momentum features of the (gathered) batch first, then the queue, without
        gradient; K = B + Q without distribution.
    targets_i2t: [B, K], row i a distribution over ``all_texts`` for image i; targets_t2i: [B, K] over
        ``all_images`` for text i. Unlike :func:`contrastive_loss` the two directions take separate
        targets (ALBEF softmaxes each direction's momentum similarities by row). Constants: detached.

    Returns ½·(CE(image->text) + CE(text->image)), averaged over the local rows, in fp32.
    """
    b = image_emb.shape[0]
    k = all_texts.shape[0]
    if (image_emb.shape != text_emb.shape or image_emb.dim() != 2 or all_images.shape != all_texts.shape
            or all_texts.dim() != 2 or all_texts.shape[1] != image_emb.shape[1]):
        raise ValueError(f"queued_contrastive_loss: rows {tuple(image_emb.shape)}/{tuple(text_emb.shape)} and "
                         f"columns {tuple(all_images.shape)}/{tuple(all_texts.shape)} must be [B, D] and [K, D]")
    if targets_i2t.shape != (b, k) or targets_t2i.shape != (b, k):
        raise ValueError(f"queued_contrastive_loss: targets must be [B, K] = [{b}, {k}], got "
                         f"{tuple(targets_i2t.shape)} and {tuple(targets_t2i.shape)}")
    logits_i2t = (image_emb @ all_texts.T).float() / temperature  # [B, K]
    logits_t2i = (text_emb @ all_images.T).float() / temperature
    return 0.5 * (F.cross_entropy(logits_i2t, targets_i2t.detach().float())
                  + F.cross_entropy(logits_t2i, targets_t2i.detach().float()))


# ---------------------------------------------------------------------------------- the node


class ITCParams(Params):
    embed_dim: int = Field(128, ge=1, description="D: the shared embedding size (projections width -> D)")
    weight: float = Field(1.0, ge=0, description="weight of the 'itc' term in the total loss")
    temperature: float = Field(0.07, gt=0, description="initial temperature τ (logits = cosine / τ)")
    temperature_min: float = Field(0.001, gt=0, description="τ is clamped to at least this")
    temperature_max: float = Field(0.5, gt=0, description="τ is clamped to at most this")
    learn_temperature: bool = Field(True, description="learn τ (False: keep it fixed)")
    mix_weight: float = Field(
        1.0, ge=0, description="weight of the 'mix_itc' term (times the mixer's γ) when a mixer is wired"
    )
    text_pool: Literal["cls", "mean"] = Field(
        "mean",
        description="caption feature: 'cls' (ALBEF) or the mean of non-pad tokens; a from-scratch post-LN "
        "BERT gives nearly one CLS vector for every caption at init and stalls ~100+ steps with 'cls'",
    )
    momentum: float | None = Field(
        None, gt=0, lt=1,
        description="ALBEF momentum distillation: EMA coefficient m of momentum copies of the towers and "
        "projections (ALBEF: 0.995), updated at the start of each training forward; the online features "
        "are scored against the momentum features (no gradient) with targets α·softmax(momentum sims / τ) "
        "+ (1-α)·one-hot. None: off (plain one-hot ITC)",
    )
    queue_size: int = Field(
        0, ge=0,
        description="ALBEF feature queue: the last queue_size momentum image and text features (a ring "
        "buffer, checkpointed) are extra negatives/columns of the loss; 0: in-batch only. Needs momentum",
    )
    distill_alpha: float = Field(
        0.4, ge=0, le=1, description="α: weight of the momentum soft targets against one-hot (with momentum)"
    )
    alpha_ramp_epochs: float = Field(
        1.0, ge=0,
        description="α ramps linearly from 0 to distill_alpha over this many epochs (batch keys step and "
        "steps_per_epoch; constant distill_alpha when they are absent or this is 0)",
    )

    @model_validator(mode="after")
    def _temperature_in_range(self) -> "ITCParams":
        check_temperature_range(self.temperature, self.temperature_min, self.temperature_max)
        return self

    @model_validator(mode="after")
    def _queue_needs_momentum(self) -> ITCParams:
        if self.queue_size > 0 and self.momentum is None:
            raise ValueError(f"queue_size {self.queue_size} needs momentum (e.g. momentum: 0.995): the queue "
                             "holds momentum features")
        return self


class ITC(LearnedTemperature, ports.Objective, ports.Embedder):
    """Contrastive objective over CLS projections; also the model's image-text embedding.

    The towers are held by reference, not as submodules: they are their own graph nodes (their own
    entry in the trial's modules, their own device placement); registering them here would put their
    weights into this module's state_dict a second time.
    """

    def __init__(self, vision: ports.VisionTower, text: ports.TextTower, params: ITCParams,
                 mixer: ports.Mixer | None = None, node: str = "itc"):
        super().__init__()
        self._towers = (vision, text)
        self.weight = params.weight
        # a plain object, not a module: whatever it holds (a patch scorer) is its own graph node
        self.mixer = mixer
        self.mix_weight = params.mix_weight
        # one key per objective: the Forward memoises tower passes by (tower, images key), and two
        # mixing objectives on one tower must not share each other's mixed images
        self.mixed_key = f"mixed_images/{node}"
        # the group whose step takes 'mix_itc': its own with steps "separate", else the main one (also
        # when other objectives give the trial several groups and this one is called with "main")
        self.mix_group = "mix" if mixer is not None and mixer.steps == "separate" else "main"
        if self.mix_group == "mix":
            self.step_groups = ("main", "mix")
        self.text_pool = params.text_pool
        self.vision_proj = nn.Linear(vision.width, params.embed_dim)
        self.text_proj = nn.Linear(text.width, params.embed_dim)
        self.init_temperature(params.temperature, params.temperature_min, params.temperature_max,
                              params.learn_temperature)
        self.momentum = params.momentum
        self.queue_size = params.queue_size if params.momentum is not None else 0
        self.distill_alpha = params.distill_alpha
        self.alpha_ramp_epochs = params.alpha_ramp_epochs
        if self.momentum is not None:
            # ALBEF's momentum model: frozen copies owned (and checkpointed) by this objective, unlike the
            # online towers it holds by reference; updated by EMA, never by the optimiser
            self.vision_m = copy.deepcopy(vision)
            self.text_m = copy.deepcopy(text)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            for module in self._momentum_pairs():
                for p in module[1].parameters():
                    p.requires_grad_(False)
            if self.queue_size > 0:
                d = params.embed_dim
                self.register_buffer("image_queue", torch.zeros(self.queue_size, d))
                self.register_buffer("text_queue", torch.zeros(self.queue_size, d))
                self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
                self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))  # filled rows

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs; empty without momentum."""
        if self.momentum is None:
            return []
        return [(self.vision, self.vision_m), (self.text, self.text_m),
                (self.vision_proj, self.vision_proj_m), (self.text_proj, self.text_proj_m)]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA: momentum = m·momentum + (1-m)·online, parameter by parameter (ALBEF ``_momentum_update``)."""
        m = self.momentum
        for online, mom in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), mom.parameters()):
                p_m.mul_(m).add_(p.detach().to(p_m.device, p_m.dtype), alpha=1 - m)

    def alpha(self, batch: dict) -> float:
        """α of the momentum soft targets: distill_alpha ramped from 0 over alpha_ramp_epochs."""
        step, per_epoch = batch.get("step"), batch.get("steps_per_epoch")
        if step is None or not per_epoch or self.alpha_ramp_epochs <= 0:
            return self.distill_alpha
        return self.distill_alpha * min(1.0, float(step) / (self.alpha_ramp_epochs * float(per_epoch)))

    def _pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return ports.pool_caption(tokens, attention_mask, self.text_pool)

    @torch.no_grad()
    def momentum_features(self, fwd: ports.Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised momentum image and caption features [B, D] (no gradient). Memoised in ``fwd``."""

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            b = fwd.batch
            with torch.no_grad():
                image = F.normalize(self.vision_proj_m(self.vision_m(b["images"])[:, 0]), dim=-1)
                tokens = self.text_m(b["input_ids"], b["attention_mask"])
                text = F.normalize(self.text_proj_m(self._pool(tokens, b["attention_mask"])), dim=-1)
            return image, text

        return fwd.memo(("objective.itc/momentum", id(self)), compute)

    @torch.no_grad()
    def _enqueue(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> None:
        """Write rows into the ring buffer (oldest overwritten first); more rows than the queue keeps the last."""
        q = self.queue_size
        n = image_feats.shape[0]
        if n >= q:
            image_feats, text_feats, n = image_feats[-q:], text_feats[-q:], q
        idx = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % q
        self.image_queue[idx] = image_feats.to(self.image_queue.dtype)
        self.text_queue[idx] = text_feats.to(self.text_queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % q)
        self.queue_count.add_(n).clamp_(max=q)

    def momentum_loss(self, fwd: ports.Forward, batch: dict) -> torch.Tensor:
        """ALBEF ITC: the online features scored against the momentum features of the batch, then the queue.

        ALBEF (models/model_pretrain.py): ``sim_i2t = image_feat @ [text_feat_m; text_queue]ᵀ / τ`` and
        the mirror for text->image, with targets α·softmax(momentum sims / τ) + (1-α)·one-hot. The
        keys are momentum features (no gradient), so the gradient reaches the online towers through
        their own rows only. Under torchrun the batch keys are every rank's momentum features
        (``concat_all_gather``, no gradient; ALBEF itself scores against the local batch's and gathers
        only into the queue), image i's positive sits at column rank·B + i, and the queue receives the
        gathered momentum features, as in ALBEF."""
        image, text = self.embed_images(fwd), self.embed_texts(fwd)
        image_m, text_m = self.momentum_features(fwd)
        rank, _ = world()
        batch_keys_img, batch_keys_txt = concat_all_gather(image_m), concat_all_gather(text_m)
        keys_img, keys_txt = batch_keys_img, batch_keys_txt
        if self.queue_size > 0:
            count = int(self.queue_count)  # ALBEF starts from a full queue of random features; this one fills up
            keys_img = torch.cat([keys_img, self.image_queue[:count].to(keys_img.dtype)])
            keys_txt = torch.cat([keys_txt, self.text_queue[:count].to(keys_txt.dtype)])
        b = image.shape[0]
        with torch.no_grad():
            tau = self.temperature.detach()
            rows = torch.arange(b, device=image.device)
            one_hot = torch.zeros(b, keys_txt.shape[0], device=image.device)
            one_hot[rows, rows + rank * b] = 1
            alpha = self.alpha(batch)
            t_i2t = alpha * F.softmax((image_m @ keys_txt.T).float() / tau, dim=1) + (1 - alpha) * one_hot
            t_t2i = alpha * F.softmax((text_m @ keys_img.T).float() / tau, dim=1) + (1 - alpha) * one_hot
        loss = queued_contrastive_loss(image, text, keys_img, keys_txt, self.temperature, t_i2t, t_t2i)
        if self.queue_size > 0 and self.training:
            self._enqueue(batch_keys_img, batch_keys_txt)
        return loss

    @property
    def vision(self) -> ports.VisionTower:
        return self._towers[0]

    @property
    def text(self) -> ports.TextTower:
        return self._towers[1]

    @property
    def logit_scale(self) -> torch.Tensor:
        """1/τ (CLIP's convention)."""
        return 1.0 / self.temperature

    def embed_images(self, fwd: ports.Forward, images_key: str = "images") -> torch.Tensor:
        """L2-normalised projection of the image CLS token: [B, D]. Memoised in ``fwd``."""

        def compute() -> torch.Tensor:
            tokens = fwd.image_tokens(self.vision, images_key)  # [B, 1+N, C], CLS first
            return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

        return fwd.memo(("objective.itc/image", id(self), images_key), compute)

    def embed_texts(self, fwd: ports.Forward) -> torch.Tensor:
        """L2-normalised projection of the caption feature (``text_pool``): [B, D]. Memoised in ``fwd``."""

        def compute() -> torch.Tensor:
            tokens = fwd.text_tokens(self.text)  # [B, L, C]
            return F.normalize(self.text_proj(self._pool(tokens, fwd.batch["attention_mask"])), dim=-1)

        return fwd.memo(("objective.itc/text", id(self)), compute)

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        """Named terms: 'itc', and 'mix_itc' when a mixer is wired and mixes this step.

        group: None (the trial takes one optimiser step: every term), "main" ('itc', and 'mix_itc' when
        the mixer's ``steps`` is "summed") or "mix" ('mix_itc'; this objective names that group only
        when the mixer's ``steps`` is "separate").
        """
        self.clamp_temperature_()
        # the mixer runs before the plain term: a patch scorer reading a middle block (head.tpp) then
        # runs the tower's block pass first and shares its final tokens with this objective's
        # embedding, instead of a second full pass; the terms do not depend on the order
        mixed = self.mixer.mix(fwd, batch, self) if self.mixer is not None and group in (None, self.mix_group) else None
        terms: dict[str, torch.Tensor] = {}
        if group in (None, "main"):
            if self.momentum is None:
                terms["itc"] = contrastive_loss(self.embed_images(fwd), self.embed_texts(fwd), self.temperature)
            else:
                if self.training:  # the objective cannot hook the optimiser step; ALBEF updates in forward too
                    self.momentum_update()
                terms["itc"] = self.momentum_loss(fwd, batch)
        if mixed is not None:
            terms["mix_itc"] = self.mixed_loss(fwd, batch, mixed)
        return terms

    def mixed_loss(self, fwd: ports.Forward, batch: dict, mixed: ports.MixedBatch) -> torch.Tensor:
        """γ · mix_weight · contrastive_loss(mixed images, captions, soft targets) (TiMix's mixed loss).

        The mixed images go into the batch under this objective's ``mixed_key`` and through the image
        tower once (memoised separately from the un-mixed pass); the captions' embeddings are the
        un-mixed step's own."""
        batch[self.mixed_key] = mixed.images
        if fwd.batch is not batch:
            fwd.batch[self.mixed_key] = mixed.images
        v_mix = self.embed_images(fwd, images_key=self.mixed_key)
        loss = contrastive_loss(v_mix, self.embed_texts(fwd), self.temperature, targets=mixed.soft_targets)
        return mixed.gamma * self.mix_weight * loss


@register(
    "objective.itc",
    params=ITCParams,
    output=ITC,
    requires=frozenset({ports.PAIRED}),
    inputs={
        "vision": In(ports.VisionTower, doc="image tower; its CLS token (position 0) is projected"),
        "text": In(ports.TextTower, doc="text tower; its mean token (or CLS, text_pool) is projected"),
        "mixer": In(ports.Mixer, optional=True, doc="adds term 'mix_itc' on mixed images with soft targets (e.g. mixer.timix)"),
    },
)
def build(params: ITCParams, inputs: dict, ctx: ports.BuildContext) -> ITC:
    """Image-text contrastive loss (CLIP / ALBEF ITC); also defines the embedding evaluators use.

    Reads the image tower's CLS token and the caption feature (`text_pool`: the mean of non-pad tokens
    by default — a deviation from ALBEF's CLS that lets from-scratch towers start learning at once —
    or the CLS token at position 0), projects each with
    a Linear(width -> embed_dim), L2-normalises, and scores every image against every caption of the
    batch: loss 'itc' = ½·(CE(image->text) + CE(text->image)) with logits = cosine / τ and caption i
    the positive of image i. τ starts at `temperature` and, with `learn_temperature`, is learned and
    clamped into [temperature_min, temperature_max] (ALBEF: 0.07 in [0.001, 0.5]). Tower passes come
    from the step's shared Forward, so other objectives reuse them. Under torchrun the features are
    gathered from every rank with gradient and each rank scores its rows against the global batch.
    With `momentum` (ALBEF: 0.995) the node owns EMA copies of both towers and projections (in its
    state_dict, no gradient), updated at the start of each training forward; 'itc' then uses targets
    α·softmax(momentum sims / τ) + (1-α)·one-hot per direction, α = distill_alpha ramped from 0 over
    `alpha_ramp_epochs`, and the online features are scored against the *momentum* features of the
    batch (gathered from every rank, no gradient), as in ALBEF, not against the online ones. With
    `queue_size` > 0 the last queue_size momentum features (a checkpointed ring buffer, enqueued after
    the loss) follow the batch as extra columns. Off by default.

    With a `mixer` wired: after 'itc', mixer.mix(fwd, batch, self) returns None (no mixing this step)
    or a MixedBatch; its images run through the image tower (batch key ``mixed_images/<node>``) and
    term 'mix_itc' = γ · mix_weight · contrastive loss against the batch's captions with the mixer's
    soft targets (image->text Y, text->image Yᵀ). With the mixer's `steps: separate` this objective
    names two optimiser step groups, "main" ('itc') and "mix" ('mix_itc'), as the TiMix reference does.
    """
    vision, text = inputs["vision"], inputs["text"]
    return ITC(vision, text, params, mixer=inputs.get("mixer"), node=ctx.node).to(ctx.device)
