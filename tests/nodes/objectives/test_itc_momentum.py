"""objective.itc with ALBEF momentum distillation and the feature queue (off by default)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tests.nodes.objectives.test_itc import itc_batch, make_itc
from vlpgraph.engine import ports
from vlpgraph.nodes.objectives.itc import (
    ITC,
    ITCParams,
    contrastive_loss,
    queued_contrastive_loss,
)

PLAIN_KEYS = {"temp", "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"}


def _perturb_online(obj: ITC) -> None:
    with torch.no_grad():
        for online in (obj.vision, obj.text, obj.vision_proj, obj.text_proj):
            for p in online.parameters():
                p.add_(torch.randn_like(p))


def test_defaults_are_off_and_add_no_state():
    p = ITCParams()
    assert (p.momentum, p.queue_size, p.distill_alpha, p.alpha_ramp_epochs) == (None, 0, 0.4, 1.0)
    obj, _, _ = make_itc()
    assert set(obj.state_dict()) == PLAIN_KEYS
    assert not any(name.endswith("_m") or "queue" in name for name, _ in obj.named_modules())


def test_momentum_state_is_registered_and_frozen():
    obj, _, _ = make_itc(momentum=0.9, queue_size=6)
    keys = set(obj.state_dict())
    assert PLAIN_KEYS < keys
    assert {"vision_m.proj.weight", "text_m.emb.weight", "vision_proj_m.weight", "text_proj_m.bias",
            "image_queue", "text_queue", "queue_ptr", "queue_count"} <= keys
    assert not any(k.startswith(("vision.", "text.")) for k in keys)  # online towers still by reference
    for mod in (obj.vision_m, obj.text_m, obj.vision_proj_m, obj.text_proj_m):
        assert all(not p.requires_grad for p in mod.parameters())


def test_validator_queue_needs_momentum():
    with pytest.raises(ValidationError, match="needs momentum"):
        ITCParams(queue_size=8)
    with pytest.raises(ValidationError):
        ITCParams(momentum=1.5)
    ITCParams(momentum=0.995, queue_size=8)


def test_ema_update_after_one_forward():
    m = 0.9
    obj, _, _ = make_itc(momentum=m)
    _perturb_online(obj)  # otherwise online == momentum and the EMA is trivially a no-op
    pairs = [(obj.vision, obj.vision_m), (obj.text, obj.text_m),
             (obj.vision_proj, obj.vision_proj_m), (obj.text_proj, obj.text_proj_m)]
    old = [[p.detach().clone() for p in mom.parameters()] for _, mom in pairs]
    online = [[p.detach().clone() for p in on.parameters()] for on, _ in pairs]
    batch = itc_batch()
    obj.train()
    obj(ports.Forward(batch), batch)
    for (_, mom), olds, ons in zip(pairs, old, online):
        for p_m, o, p in zip(mom.parameters(), olds, ons):
            torch.testing.assert_close(p_m.detach(), m * o + (1 - m) * p)
    # eval mode: no update
    before = [p.clone() for p in obj.vision_m.parameters()]
    obj.eval()
    obj(ports.Forward(batch), batch)
    for a, b in zip(before, obj.vision_m.parameters()):
        assert torch.equal(a, b)


def test_queue_fills_as_ring_buffer_and_wraps():
    obj, _, _ = make_itc(momentum=0.9, queue_size=7)
    obj.train()
    seen_img = []
    for step in range(4):  # 4 batches of 3 = 12 rows through a queue of 7
        batch = itc_batch(b=3, seed=step)
        fwd = ports.Forward(batch)
        out = obj(fwd, batch)
        assert torch.isfinite(out["itc"])
        seen_img.append(obj.momentum_features(fwd)[0].detach().clone())
        assert int(obj.queue_count) == min(7, 3 * (step + 1))
        assert int(obj.queue_ptr) == (3 * (step + 1)) % 7
    rows = torch.cat(seen_img)  # [12, D]
    # ring positions: row r sits at r % 7; the last 7 rows (5..11) survive
    for r in range(5, 12):
        torch.testing.assert_close(obj.image_queue[r % 7], rows[r])
    # the queue checkpoints and restores
    clone, _, _ = make_itc(momentum=0.9, queue_size=7)
    clone.load_state_dict(obj.state_dict())
    assert torch.equal(clone.image_queue, obj.image_queue) and int(clone.queue_ptr) == int(obj.queue_ptr)


def test_queue_larger_batch_than_queue_keeps_last_rows():
    obj, _, _ = make_itc(momentum=0.9, queue_size=2)
    obj.train()
    batch = itc_batch(b=5)
    fwd = ports.Forward(batch)
    obj(fwd, batch)
    img_m = obj.momentum_features(fwd)[0]
    assert int(obj.queue_count) == 2
    torch.testing.assert_close(obj.image_queue[int(obj.queue_ptr) - 2 :][:1], img_m[3:4])


def test_alpha_zero_at_init_has_plain_itc_value_but_no_gradient_through_the_keys():
    """At init the momentum copies equal the online towers, so with α = 0 the loss *value* is plain
    ITC's; its gradient is not: plain ITC also differentiates through the columns (keys), ALBEF not."""
    obj, vision, text = make_itc(momentum=0.995, distill_alpha=0.0)
    plain = ITC(vision, text, ITCParams(embed_dim=4))
    plain.load_state_dict({k: v for k, v in obj.state_dict().items() if k in PLAIN_KEYS})
    batch = itc_batch()
    got = obj(ports.Forward(batch), batch)["itc"]
    ref = plain(ports.Forward(batch), batch)["itc"]
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()
    grad_momentum = vision.proj.weight.grad.clone()
    vision.zero_grad()
    ref.backward()
    assert not torch.allclose(grad_momentum, vision.proj.weight.grad, atol=1e-6)


def test_alpha_ramps_with_step():
    obj, _, _ = make_itc(momentum=0.9, distill_alpha=0.4, alpha_ramp_epochs=2.0)
    assert obj.alpha({}) == pytest.approx(0.4)
    assert obj.alpha({"step": 0, "steps_per_epoch": 10}) == 0.0
    assert obj.alpha({"step": 5, "steps_per_epoch": 10}) == pytest.approx(0.1)
    assert obj.alpha({"step": 50, "steps_per_epoch": 10}) == pytest.approx(0.4)


def test_soft_targets_change_the_loss():
    obj, _, _ = make_itc(momentum=0.9, distill_alpha=0.0)
    obj2, _, _ = make_itc(momentum=0.9, distill_alpha=1.0)
    obj2.load_state_dict(obj.state_dict())
    obj2._towers = obj._towers
    obj2.vision_m.load_state_dict(obj.vision_m.state_dict())
    batch = itc_batch()
    a = obj(ports.Forward(batch), batch)["itc"].item()
    b = obj2(ports.Forward(batch), batch)["itc"].item()
    assert abs(a - b) > 1e-4


def test_queued_loss_without_queue_and_one_hot_matches_contrastive_loss():
    img = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    eye = torch.eye(4)
    got = queued_contrastive_loss(img, txt, img, txt, 0.1, eye, eye)
    assert got.item() == pytest.approx(contrastive_loss(img, txt, 0.1).item(), rel=1e-5)
    with pytest.raises(ValueError, match="targets must be"):
        queued_contrastive_loss(img, txt, img, txt, 0.1, torch.eye(5), eye)


def test_gradient_does_not_reach_momentum_params():
    obj, vision, text = make_itc(momentum=0.9, queue_size=4)
    obj.train()
    for step in range(2):  # second step scores against a non-empty queue
        batch = itc_batch(b=3, seed=step)
        loss = obj(ports.Forward(batch), batch)["itc"]
        loss.backward()
    for mod in (obj.vision_m, obj.text_m, obj.vision_proj_m, obj.text_proj_m):
        assert all(p.grad is None for p in mod.parameters())
    assert obj.image_queue.grad is None and not obj.image_queue.requires_grad
    assert obj.vision_proj.weight.grad is not None and vision.proj.weight.grad is not None
    assert text.emb.weight.grad is not None and obj.temp.grad is not None


# ------------------------------------------------------- ALBEF's formula, transcribed independently


def albef_itc_reference(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                        alpha, temp, offset=0):
    """ALBEF's ITC, transcribed from salesforce/ALBEF models/model_pretrain.py (forward, distill=True).

    image_feat, text_feat: [B, D] online features (with gradient); image_feat_m, text_feat_m: [K, D]
    the momentum features of the (global) batch; image_queue, text_queue: [Q, D] rows (ALBEF keeps
    them as [D, Q] columns); offset: where this rank's batch starts among the K momentum rows (0 on
    one process, where ALBEF's ``fill_diagonal_`` applies)."""
    b = image_feat.shape[0]
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.t().clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.t().clone().detach()], dim=1)
        local_image_m, local_text_m = image_feat_m[offset : offset + b], text_feat_m[offset : offset + b]
        sim_i2t_m = local_image_m @ text_feat_all / temp
        sim_t2i_m = local_text_m @ image_feat_all / temp
        sim_targets = torch.zeros(sim_i2t_m.size())
        sim_targets[:, offset : offset + b].fill_diagonal_(1)
        sim_i2t_targets = alpha * torch.nn.functional.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * torch.nn.functional.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(torch.nn.functional.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(torch.nn.functional.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def _features(obj: ITC, vision, text, batch: dict, momentum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised CLS projections straight from the modules (text_pool 'cls', as ALBEF)."""
    v, t, vp, tp = ((obj.vision_m, obj.text_m, obj.vision_proj_m, obj.text_proj_m) if momentum
                    else (vision, text, obj.vision_proj, obj.text_proj))
    normalize = torch.nn.functional.normalize
    image = normalize(vp(v(batch["images"])[:, 0, :]), dim=-1)
    txt = normalize(tp(t(batch["input_ids"], batch["attention_mask"])[:, 0, :]), dim=-1)
    return image, txt


def _albef_node(queue_size: int = 6, seed: int = 0) -> tuple[ITC, object, object]:
    """A momentum ITC whose online towers differ from the momentum copies and whose queue is full."""
    torch.manual_seed(seed)
    obj, vision, text = make_itc(momentum=0.9, queue_size=queue_size, distill_alpha=0.4,
                                 alpha_ramp_epochs=1.0, text_pool="cls")
    _perturb_online(obj)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        obj.image_queue.copy_(torch.nn.functional.normalize(torch.randn(queue_size, 4, generator=g), dim=-1))
        obj.text_queue.copy_(torch.nn.functional.normalize(torch.randn(queue_size, 4, generator=g), dim=-1))
        obj.queue_count.fill_(queue_size)
        obj.temp.fill_(0.1)
    return obj, vision, text


def test_momentum_itc_equals_albef_transcription_in_value_and_gradient():
    obj, vision, text = _albef_node()
    queue_img, queue_txt = obj.image_queue.clone(), obj.text_queue.clone()
    batch = {**itc_batch(b=3), "step": 2, "steps_per_epoch": 4}  # α = 0.4 · 2/4
    obj.train()
    loss = obj(ports.Forward(batch), batch)["itc"]
    loss.backward()
    online = {"vision": vision.proj.weight, "text": text.emb.weight, "vision_proj": obj.vision_proj.weight,
              "text_proj": obj.text_proj.weight, "temp": obj.temp}
    got = {k: p.grad.clone() for k, p in online.items()}
    for p in online.values():
        p.grad = None

    # the reference: the momentum copies as this step's EMA left them, the online towers untouched
    image_feat, text_feat = _features(obj, vision, text, batch, momentum=False)
    with torch.no_grad():
        image_feat_m, text_feat_m = _features(obj, vision, text, batch, momentum=True)
    ref = albef_itc_reference(image_feat, text_feat, image_feat_m, text_feat_m, queue_img, queue_txt,
                              alpha=0.2, temp=obj.temp)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for k, p in online.items():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the queue now holds this batch's momentum features (after the loss, as ALBEF enqueues)
    torch.testing.assert_close(obj.image_queue[:3], image_feat_m)
    torch.testing.assert_close(obj.text_queue[:3], text_feat_m)


def test_keys_carry_no_gradient():
    """The online features receive gradient as rows (queries) only, never as keys: each modality's
    gradient equals the reference's, where the keys are the momentum features (constants). Scoring
    against the online batch, as before, adds the key gradient and differs."""
    obj, _, _ = _albef_node(queue_size=4)
    queue_img, queue_txt = obj.image_queue.clone(), obj.text_queue.clone()
    obj.train()
    batch = itc_batch(b=3)
    fwd = ports.Forward(batch)
    image, txt = obj.embed_images(fwd), obj.embed_texts(fwd)
    image.retain_grad()
    txt.retain_grad()
    obj.momentum_loss(fwd, batch).backward()

    image_m, text_m = obj.momentum_features(fwd)
    i, t = image.detach().requires_grad_(), txt.detach().requires_grad_()
    albef_itc_reference(i, t, image_m, text_m, queue_img, queue_txt, alpha=obj.alpha(batch),
                        temp=obj.temperature.detach()).backward()
    torch.testing.assert_close(image.grad, i.grad)
    torch.testing.assert_close(txt.grad, t.grad)


def _online_grads(obj: ITC) -> dict[str, torch.Tensor]:
    vision, text = obj.vision, obj.text
    return {"vision": vision.proj.weight.grad, "text": text.emb.weight.grad,
            "vision_proj": obj.vision_proj.weight.grad, "text_proj": obj.text_proj.weight.grad, "temp": obj.temp.grad}


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        obj, _, _ = _albef_node(queue_size=8)  # the same weights and queue on every rank
        obj.train()
        full = itc_batch(b=3 * world)
        batch = {k: v[rank * 3 : rank * 3 + 3] for k, v in full.items()}
        loss = obj(ports.Forward(batch), batch)["itc"]
        loss.backward()
        grads = {k: v.clone() for k, v in _online_grads(obj).items()}
        torch.save({"loss": loss.detach(), "grads": grads, "image_queue": obj.image_queue.clone(),
                    "queue_ptr": obj.queue_ptr.clone()}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_two_process_gloo_momentum_itc_equals_transcription(tmp_path):
    """Under torchrun each rank's loss and gradient are ALBEF's formula over its own rows against
    every rank's momentum features (gathered without gradient) and the queue; the queue receives
    the gathered momentum features on every rank."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    obj, vision, text = _albef_node(queue_size=8)
    queue_img, queue_txt = obj.image_queue.clone(), obj.text_queue.clone()
    obj.momentum_update()  # what each rank's forward did first
    full = itc_batch(b=3 * world)
    with torch.no_grad():
        image_feat_m, text_feat_m = _features(obj, vision, text, full, momentum=True)
    for r in range(world):
        rows = {k: v[r * 3 : r * 3 + 3] for k, v in full.items()}
        obj.zero_grad()
        vision.zero_grad()
        text.zero_grad()
        image_feat, text_feat = _features(obj, vision, text, rows, momentum=False)
        ref = albef_itc_reference(image_feat, text_feat, image_feat_m, text_feat_m, queue_img, queue_txt,
                                  alpha=0.4, temp=obj.temp, offset=3 * r)
        ref.backward()
        assert res[r]["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
        for k, grad in _online_grads(obj).items():
            torch.testing.assert_close(res[r]["grads"][k], grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res[r]["image_queue"][: 3 * world], image_feat_m)
        assert int(res[r]["queue_ptr"]) == 3 * world
