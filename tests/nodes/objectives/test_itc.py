"""objective.itc: the contrastive loss, the temperature, Forward sharing, the embedding, distribution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from tests.helpers import FakeText, FakeVision, build_ctx, make_batch
from vlpgraph.engine import ports, registry
from vlpgraph.nodes.objectives import itc as itc_mod
from vlpgraph.nodes.objectives.itc import ITC, ITCParams, contrastive_loss, gather_with_grad


def _kind(name: str) -> registry.NodeKind:
    # Importing the module registered the kind; read it without registry.get(), which would import
    # every node module (some are written concurrently and may not import yet).
    return registry._KINDS[name]


def make_itc(**params) -> tuple[ITC, FakeVision, FakeText]:
    vision, text = FakeVision(), FakeText()
    obj = itc_mod.build(ITCParams(embed_dim=4, **params), {"vision": vision, "text": text}, build_ctx("itc"))
    return obj, vision, text


def itc_batch(b: int = 5, seed: int = 0) -> dict:
    """``b`` random 4 x 4 images and captions of 7 random tokens."""
    return make_batch(b, 4, seed, text_len=7)


# ------------------------------------------------------------------------------ contrastive_loss


def reference_loss(img: list[list[float]], txt: list[list[float]], tau: float, targets=None) -> float:
    """Symmetric InfoNCE written out with Python floats."""
    b = len(img)
    sim = [[sum(a * c for a, c in zip(img[i], txt[j])) / tau for j in range(b)] for i in range(b)]
    if targets is None:
        targets = [[1.0 if i == j else 0.0 for j in range(b)] for i in range(b)]

    def ce(rows, tgt):
        total = 0.0
        for r, t in zip(rows, tgt):
            lse = math.log(sum(math.exp(x) for x in r))
            total += -sum(ti * (x - lse) for x, ti in zip(r, t))
        return total / len(rows)

    sim_t = [[sim[j][i] for j in range(b)] for i in range(b)]
    tgt_t = [[targets[j][i] for j in range(b)] for i in range(b)]
    return 0.5 * (ce(sim, targets) + ce(sim_t, tgt_t))


def test_loss_matches_hand_computed_reference():
    img = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    txt = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    got = contrastive_loss(torch.tensor(img), torch.tensor(txt), 0.5)
    # worked by hand for the first row: sims/τ = [1.6, 0, 2]; CE = lse - 1.6
    row0 = math.log(math.exp(1.6) + 1 + math.exp(2)) - 1.6
    assert row0 > 0
    assert got.item() == pytest.approx(reference_loss(img, txt, 0.5), rel=1e-5)
    assert got.dtype == torch.float32 and got.dim() == 0


def test_one_hot_targets_equal_default_labels():
    img, txt = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    plain = contrastive_loss(img, txt, 0.07)
    one_hot = contrastive_loss(img, txt, 0.07, targets=torch.eye(6))
    assert one_hot.item() == pytest.approx(plain.item(), rel=1e-6)


def test_aligned_embeddings_at_low_temperature_give_near_zero_loss():
    emb = torch.eye(5)
    assert contrastive_loss(emb, emb, 0.01).item() < 1e-6
    # and misaligned ones do not
    assert contrastive_loss(emb, emb.roll(1, 0), 0.01).item() > 10


def test_soft_targets_use_transpose_for_text_to_image():
    img, txt = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 3), dim=-1)
    targets = torch.softmax(torch.randn(4, 4) * 3, dim=1)  # rows sum to 1, not symmetric
    got = contrastive_loss(img, txt, 0.1, targets=targets)
    assert got.item() == pytest.approx(reference_loss(img.tolist(), txt.tolist(), 0.1, targets.tolist()), rel=1e-5)
    # the untransposed variant (the TiMix reference's quirk) is a different number
    quirk = 0.5 * (F.cross_entropy(img @ txt.T / 0.1, targets) + F.cross_entropy(txt @ img.T / 0.1, targets))
    assert abs(got.item() - quirk.item()) > 1e-4


def test_soft_targets_shape_checked():
    emb = torch.eye(3)
    with pytest.raises(ValueError, match="targets must be"):
        contrastive_loss(emb, emb, 0.1, targets=torch.eye(4))
    with pytest.raises(ValueError, match="must both be"):
        contrastive_loss(emb, torch.eye(4), 0.1)


def test_loss_gradient_reaches_embeddings_and_temperature_tensor():
    img = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    tau = torch.tensor(0.2, requires_grad=True)
    contrastive_loss(img, F.normalize(torch.randn(4, 3), dim=-1), tau).backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert tau.grad is not None and tau.grad.item() != 0


# ------------------------------------------------------------------------------------ the node


def test_kind_declaration():
    kind = _kind("objective.itc")
    assert issubclass(kind.output, ports.Objective) and issubclass(kind.output, ports.Embedder)
    assert kind.inputs["vision"].type_tuple == (ports.VisionTower,)
    assert kind.inputs["text"].type_tuple == (ports.TextTower,)
    assert kind.params is ITCParams
    assert kind.summary.startswith("Image-text contrastive loss")
    p = ITCParams()
    assert (p.embed_dim, p.weight, p.temperature, p.temperature_min, p.temperature_max, p.learn_temperature) == (
        128, 1.0, 0.07, 0.001, 0.5, True)


def test_params_are_validated():
    with pytest.raises(ValidationError, match="temperature"):
        ITCParams(temperature=0.9)
    with pytest.raises(ValidationError):
        ITCParams(embed_dim=0)
    with pytest.raises(ValidationError):
        ITCParams(temprature=0.1)  # unknown key


def test_forward_returns_named_term_and_gradients_reach_temperature_and_towers():
    obj, vision, text = make_itc(weight=0.5)
    assert obj.weight == 0.5
    batch = itc_batch()
    out = obj(ports.Forward(batch), batch)
    assert set(out) == {"itc"} and out["itc"].dim() == 0
    out["itc"].backward()
    assert isinstance(obj.temp, nn.Parameter) and obj.temp.grad is not None and obj.temp.grad.item() != 0
    assert obj.vision_proj.weight.grad is not None and obj.text_proj.weight.grad is not None
    assert vision.proj.weight.grad is not None and text.emb.weight.grad is not None


def test_fixed_temperature_is_a_buffer():
    obj, _, _ = make_itc(learn_temperature=False, temperature=0.1)
    assert "temp" not in dict(obj.named_parameters()) and "temp" in dict(obj.named_buffers())
    assert obj.temperature.item() == pytest.approx(0.1)


def test_temperature_is_clamped_and_can_come_back():
    obj, _, _ = make_itc()
    with torch.no_grad():
        obj.temp.fill_(5.0)
    assert obj.temperature.item() == pytest.approx(0.5)  # clamped value even before any forward
    batch = itc_batch()
    fwd = ports.Forward(batch)
    loss = obj(fwd, batch)["itc"]
    assert obj.temp.item() == pytest.approx(0.5)  # ALBEF: the parameter itself is clamped in forward
    with torch.no_grad():
        obj.temp.fill_(1e-6)
    assert obj.temperature.item() == pytest.approx(0.001)
    # a second forward in the same step clamps in place again; the first graph must survive it
    loss2 = obj(ports.Forward(batch), batch)["itc"]
    (loss + loss2).backward()
    assert obj.temp.grad is not None and obj.temp.grad.item() != 0  # straight-through at the bound
    assert obj.logit_scale.item() == pytest.approx(1 / 0.001)


def test_each_tower_runs_once_per_step_however_many_consumers():
    obj, vision, text = make_itc()
    other = ITC(vision, text, ITCParams(embed_dim=3))  # a second objective on the same towers
    batch = itc_batch()
    fwd = ports.Forward(batch)
    obj(fwd, batch)
    other(fwd, batch)
    obj.embed_images(fwd)
    obj.embed_texts(fwd)
    assert (vision.calls, text.calls) == (1, 1)
    obj(ports.Forward(batch), batch)  # a new step runs them again
    assert (vision.calls, text.calls) == (2, 2)


def test_embeddings_are_normalised_and_work_with_one_modality():
    obj, vision, text = make_itc()
    batch = itc_batch(b=3)
    img = obj.embed_images(ports.Forward({"images": batch["images"]}))
    txt = obj.embed_texts(ports.Forward({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}))
    assert img.shape == (3, 4) and txt.shape == (3, 4)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    # the loss is exactly contrastive_loss of these embeddings
    loss = obj(ports.Forward(batch), batch)["itc"]
    assert loss.item() == pytest.approx(contrastive_loss(img, txt, 0.07).item(), rel=1e-5)


def test_towers_are_not_part_of_the_objective_state():
    obj, _, _ = make_itc()
    assert set(obj.state_dict()) == {"temp", "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"}


# ---------------------------------------------------------------------------------- distributed


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(0)  # same global batch on every rank
        img_all = F.normalize(torch.randn(world * 3, 4, generator=g), dim=-1)
        txt_all = F.normalize(torch.randn(world * 3, 4, generator=g), dim=-1)
        soft_all = torch.softmax(torch.randn(world * 3, 3, generator=g), dim=1)
        rows = slice(rank * 3, rank * 3 + 3)
        results = {}
        for name, targets in (("hard", None), ("soft", soft_all[rows])):
            img = img_all[rows].clone().requires_grad_()
            txt = txt_all[rows].clone().requires_grad_()
            gathered = gather_with_grad(img)
            loss = contrastive_loss(img, txt, 0.1, targets=targets)
            loss.backward()
            results[name] = (loss.detach(), img.grad, txt.grad, gathered.detach())
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks (seen: SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_two_process_gloo_gather_matches_global_batch(tmp_path):
    """Local rows vs gathered columns: the mean of the ranks' losses is the loss of the local-row
    decomposition of the global batch, and the gradient reaches each rank's own rows."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    g = torch.Generator().manual_seed(0)
    img_all = F.normalize(torch.randn(world * 3, 4, generator=g), dim=-1)
    txt_all = F.normalize(torch.randn(world * 3, 4, generator=g), dim=-1)
    soft_all = torch.softmax(torch.randn(world * 3, 3, generator=g), dim=1)
    # block-diagonal global soft targets: rank r's [3,3] block sits at its own columns
    soft_global = torch.block_diag(*[soft_all[r * 3 : r * 3 + 3] for r in range(world)])
    for name, targets in (("hard", None), ("soft", soft_global)):
        img = img_all.clone().requires_grad_()
        txt = txt_all.clone().requires_grad_()
        # the ranks' losses sum to world * (the global loss), because each averages over its own rows
        contrastive_loss(img, txt, 0.1, targets=targets).mul(world).backward()
        ref = contrastive_loss(img_all, txt_all, 0.1, targets=targets).item()
        assert sum(r[name][0].item() for r in res) / world == pytest.approx(ref, rel=1e-5)
        for r in range(world):
            _, img_grad, txt_grad, gathered = res[r][name]
            assert torch.allclose(gathered, img_all, atol=1e-6)
            assert torch.allclose(img_grad, img.grad[r * 3 : r * 3 + 3], atol=1e-5)
            assert torch.allclose(txt_grad, txt.grad[r * 3 : r * 3 + 3], atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_text_pool_ignores_padding(pool):
    """The caption feature of a padded caption equals that of the same caption unpadded."""
    obj, _, _ = make_itc(text_pool=pool)
    ids = torch.tensor([[2, 7, 9, 3]])
    padded = {"input_ids": torch.tensor([[2, 7, 9, 3, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}
    short = obj.embed_texts(ports.Forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    long = obj.embed_texts(ports.Forward(padded))
    torch.testing.assert_close(short, long)


def test_text_pool_mean_differs_from_cls():
    a, _, _ = make_itc(text_pool="mean")
    b, _, _ = make_itc(text_pool="cls")
    b.load_state_dict(a.state_dict())
    batch = itc_batch()
    assert not torch.allclose(a.embed_texts(ports.Forward(batch)), b.embed_texts(ports.Forward(batch)))
