"""objective.itc with ALBEF momentum distillation and the feature queue (off by default)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tests.test_itc import make_batch, make_itc
from vlpgraph import ports
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
    batch = make_batch()
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
        batch = make_batch(b=3, seed=step)
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
    batch = make_batch(b=5)
    fwd = ports.Forward(batch)
    obj(fwd, batch)
    img_m = obj.momentum_features(fwd)[0]
    assert int(obj.queue_count) == 2
    torch.testing.assert_close(obj.image_queue[int(obj.queue_ptr) - 2 :][:1], img_m[3:4])


def test_alpha_zero_equals_plain_itc():
    obj, vision, text = make_itc(momentum=0.995, distill_alpha=0.0)
    plain = ITC(vision, text, ITCParams(embed_dim=4))
    plain.load_state_dict({k: v for k, v in obj.state_dict().items() if k in PLAIN_KEYS})
    batch = make_batch()
    got = obj(ports.Forward(batch), batch)["itc"]
    ref = plain(ports.Forward(batch), batch)["itc"]
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


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
    batch = make_batch()
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
        batch = make_batch(b=3, seed=step)
        loss = obj(ports.Forward(batch), batch)["itc"]
        loss.backward()
    for mod in (obj.vision_m, obj.text_m, obj.vision_proj_m, obj.text_proj_m):
        assert all(p.grad is None for p in mod.parameters())
    assert obj.image_queue.grad is None and not obj.image_queue.requires_grad
    assert obj.vision_proj.weight.grad is not None and vision.proj.weight.grad is not None
    assert text.emb.weight.grad is not None and obj.temp.grad is not None
