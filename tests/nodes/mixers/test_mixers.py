"""Mixers (mixer.timix, mixer.mixup, mixer.cutmix), their shared helpers and objective.itc's mixer input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tests.helpers import FakeText, FakeVision, build_ctx, itc, make_batch, node, shapes, text, tiny_graph, trainer, vit
from vlpgraph.engine import ports, registry
from vlpgraph.layers import mixing
from vlpgraph.errors import TrialFailed
from vlpgraph.nodes.mixers import cutmix as cutmix_mod
from vlpgraph.nodes.mixers import mixup as mixup_mod
from vlpgraph.nodes.mixers import timix as timix_mod
from vlpgraph.nodes.objectives import itc as itc_mod
from vlpgraph.nodes.objectives.itc import ITCParams, contrastive_loss

CTX = build_ctx("mix")


# ------------------------------------------------------------------------------------------ fakes


class FakeScorer(ports.PatchScorer):
    """Returns the score maps it was given (or batch["scores"]); counts calls."""

    def __init__(self, s: int, scores: torch.Tensor | None = None):
        super().__init__()
        self.grid_size = (s, s)
        self.scores = scores
        self.calls = 0

    def patch_scores(self, fwd, images_key="images"):
        self.calls += 1
        return self.scores if self.scores is not None else fwd.batch["scores"]


class FakeEmbedder(ports.Embedder):
    """Fixed random projections of images and of batch["text_feats"]; τ = 0.5."""

    def __init__(self, pixels: int, dim: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(pixels, dim, generator=g)
        self.temperature = torch.tensor(0.5)

    def embed_images(self, fwd):
        return F.normalize(fwd.batch["images"].flatten(1) @ self.w, dim=-1)

    def embed_texts(self, fwd):
        return F.normalize(fwd.batch["text_feats"], dim=-1)

    def probs(self, batch):
        fwd = ports.Forward(batch)
        return torch.softmax(self.embed_images(fwd) @ self.embed_texts(fwd).T / 0.5, dim=1)


def image_batch(b: int, size: int, seed: int = 0, **extra) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "images": torch.randn(b, 3, size, size, generator=g),
        "text_feats": torch.randn(b, 5, generator=g),
        "step": 10, "steps_per_epoch": 10, "progress": 0.1, "total_steps": 100,
    }
    batch.update(extra)
    return batch


def make_timix(scorer, **params) -> timix_mod.TiMix:
    return timix_mod.build(timix_mod.TiMixParams(**params), {"scorer": scorer}, CTX)


# --------------------------------------------------------------------------------- window search


def brute_sums(maps: torch.Tensor, r: int) -> torch.Tensor:
    b, s, _ = maps.shape
    out = torch.empty(b, s - r + 1, s - r + 1, dtype=torch.float64)
    for i, y, x in itertools.product(range(b), range(s - r + 1), range(s - r + 1)):
        out[i, y, x] = maps[i, y:y + r, x:x + r].double().sum()
    return out


@pytest.mark.parametrize("s", [1, 3, 4, 7, 8])
def test_window_sums_and_extremes_equal_brute_force(s):
    g = torch.Generator().manual_seed(s)
    maps = torch.randn(3, s, s, generator=g)
    for r in range(1, s + 1):
        got, ref = mixing.window_sums(maps, r), brute_sums(maps, r)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)
        for i in range(3):
            flat = ref[i].flatten()
            q = s - r + 1
            assert tuple(mixing.window_argmin(got)[i].tolist()) == divmod(int(flat.argmin()), q)
            assert tuple(mixing.window_argmax(got)[i].tolist()) == divmod(int(flat.argmax()), q)


def test_window_sums_reject_bad_shapes():
    with pytest.raises(ValueError, match="r=0"):
        mixing.window_sums(torch.zeros(1, 4, 4), 0)
    with pytest.raises(ValueError, match="r=5"):
        mixing.window_sums(torch.zeros(1, 4, 4), 5)
    with pytest.raises(ValueError, match=r"\[B, S, S\]"):
        mixing.window_sums(torch.zeros(4, 4), 2)


# ---------------------------------------------------------------------------------- TiMix: paste


def known_scores(b: int, s: int, r: int, dst: list[tuple[int, int]], src: list[tuple[int, int]]) -> torch.Tensor:
    """Maps whose unique least-relevant r×r window is dst[i] and most-relevant one is src[i]."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(b, s, s, generator=g) * 0.1
    for i in range(b):
        (dy, dx), (sy, sx) = dst[i], src[i]
        scores[i, dy:dy + r, dx:dx + r] -= 10
        scores[i, sy:sy + r, sx:sx + r] += 10
    return scores


def test_pasted_window_lands_at_least_relevant_and_comes_from_partners_most_relevant():
    b, s, cell, r = 4, 4, 2, 2
    dst = [(0, 0), (2, 2), (0, 2), (2, 0)]
    src = [(2, 2), (0, 0), (2, 0), (1, 1)]
    scorer = FakeScorer(s, known_scores(b, s, r, dst, src))
    mixer = make_timix(scorer, min_ratio=0.5, max_ratio=0.5)  # r = ⌊0.5·4⌋ = 2
    batch = image_batch(b, s * cell)
    images = batch["images"].clone()
    out = mixer.mix(ports.Forward(batch), batch, FakeEmbedder(3 * 64))
    assert out.info["r"] == r and out.info["patch_size"] == cell
    assert out.partner.tolist() == [3, 2, 1, 0]
    assert [tuple(x) for x in out.info["dst"].tolist()] == dst
    assert [tuple(x) for x in out.info["src"].tolist()] == [src[3 - i] for i in range(b)]
    assert torch.equal(batch["images"], images)  # the un-mixed batch is untouched
    for i in range(b):
        p = b - 1 - i
        (dy, dx), (sy, sx) = dst[i], src[p]
        ys, xs = slice(dy * cell, (dy + r) * cell), slice(dx * cell, (dx + r) * cell)
        assert torch.equal(out.images[i][:, ys, xs], images[p][:, sy * cell:(sy + r) * cell, sx * cell:(sx + r) * cell])
        outside = torch.ones(s * cell, s * cell, dtype=torch.bool)
        outside[ys, xs] = False
        assert torch.equal(out.images[i][:, outside], images[i][:, outside])


def test_paste_windows_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 12, 12, generator=g)
    partner = mixing.flip_partner(6)
    src = torch.randint(0, 3, (6, 2), generator=g)
    dst = torch.randint(0, 3, (6, 2), generator=g)
    got = mixing.paste_windows(images, partner, src, dst, size=2, cell=3)
    ref = images.clone()
    for i in range(6):
        (sy, sx), (dy, dx) = (src[i] * 3).tolist(), (dst[i] * 3).tolist()
        ref[i, :, dy:dy + 6, dx:dx + 6] = images[partner[i], :, sy:sy + 6, sx:sx + 6]
    assert torch.equal(got, ref)


# ------------------------------------------------------------------------------ TiMix: targets


def test_area_lambda_and_soft_targets():
    b, s = 6, 8
    batch = image_batch(b, 16, scores=torch.randn(b, s, s))
    emb = FakeEmbedder(3 * 256)
    out = make_timix(FakeScorer(s), min_ratio=0.5, max_ratio=0.5).mix(ports.Forward(batch), batch, emb)
    r = 4
    assert torch.allclose(out.lam, torch.full((b,), (s * s - r * r) / (s * s)))
    p = emb.probs(batch)
    lam = out.lam[:, None]
    torch.testing.assert_close(out.soft_targets, lam * p + (1 - lam) * p.flip(0))
    torch.testing.assert_close(out.soft_targets.sum(1), torch.ones(b))
    assert not out.soft_targets.requires_grad


def test_window_side_zero_gives_the_unmixed_prediction():
    b = 4
    batch = image_batch(b, 8, scores=torch.randn(b, 4, 4))
    emb = FakeEmbedder(3 * 64)
    out = make_timix(FakeScorer(4), min_ratio=0.0, max_ratio=0.0).mix(ports.Forward(batch), batch, emb)
    assert out.info["r"] == 0
    assert torch.equal(out.images, batch["images"]) and torch.equal(out.lam, torch.ones(b))
    torch.testing.assert_close(out.soft_targets, emb.probs(batch))


def test_score_label():
    b, s, r = 2, 4, 2
    # uniform scores: the relevance mass of a window is its area share, so 'score' == 'area'
    batch = image_batch(b, 8, scores=torch.zeros(b, s, s))
    emb = FakeEmbedder(3 * 64)
    out = make_timix(FakeScorer(s), min_ratio=0.5, max_ratio=0.5, label="score").mix(ports.Forward(batch), batch, emb)
    torch.testing.assert_close(out.lam, torch.full((b,), 0.75))
    # graded maps with known windows (r = 2): image 0 rises to the bottom right; image 1 also carries
    # a bump in window (0, 2), which is pasted into image 0 and outweighs what image 0 keeps
    grade = 0.1 * torch.arange(s * s, dtype=torch.float32).view(s, s)
    scores = torch.stack([grade, grade.clone()])
    scores[1, 0:2, 2:4] += 2.0
    batch = image_batch(b, 8, scores=scores)
    out = make_timix(FakeScorer(s), min_ratio=0.5, max_ratio=0.5, label="score").mix(ports.Forward(batch), batch, emb)
    assert out.info["dst"].tolist() == [[0, 0], [0, 0]] and out.info["src"].tolist() == [[0, 2], [2, 2]]
    w = torch.softmax(scores.flatten(1), 1).view(b, s, s)
    for i, (sy, sx) in ((0, (0, 2)), (1, (2, 2))):
        kept = 1 - w[i, 0:2, 0:2].sum()
        pasted = w[1 - i, sy:sy + r, sx:sx + r].sum()
        assert out.lam[i].item() == pytest.approx((kept / (kept + pasted)).item(), rel=1e-5)
    assert out.lam[0].item() < 0.75 and out.lam[0].item() < out.lam[1].item()


def test_odd_batch_middle_image_is_left_unmixed():
    b, s = 5, 4
    batch = image_batch(b, 8, scores=torch.randn(b, s, s))
    emb = FakeEmbedder(3 * 64)
    out = make_timix(FakeScorer(s), min_ratio=0.5, max_ratio=0.5).mix(ports.Forward(batch), batch, emb)
    assert out.partner[2] == 2 and out.lam[2] == 1.0
    assert torch.equal(out.images[2], batch["images"][2])
    assert out.info["src"][2].tolist() == [-1, -1] and out.info["dst"][2].tolist() == [-1, -1]
    torch.testing.assert_close(out.soft_targets[2], emb.probs(batch)[2])
    assert not torch.equal(out.images[0], batch["images"][0])


def test_patch_grid_must_tile_the_images():
    batch = image_batch(2, 10, scores=torch.randn(2, 4, 4))
    with pytest.raises(TrialFailed, match="do not tile"):
        make_timix(FakeScorer(4)).mix(ports.Forward(batch), batch, FakeEmbedder(300))


# ----------------------------------------------------------------------- schedule and determinism


def test_gamma_ramp_and_stop_fraction():
    assert mixing.schedule({"step": 0, "steps_per_epoch": 10, "progress": 0.0}, 1.0, 0.667) is None  # γ = 0
    assert mixing.schedule({"step": 5, "steps_per_epoch": 10, "progress": 0.1}, 1.0, 0.667) == pytest.approx(0.5)
    assert mixing.schedule({"step": 5, "steps_per_epoch": 10, "progress": 0.1}, 2.0, 0.667) == pytest.approx(0.25)
    assert mixing.schedule({"step": 30, "steps_per_epoch": 10, "progress": 0.3}, 1.0, 0.667) == 1.0
    assert mixing.schedule({"step": 0, "steps_per_epoch": 10, "progress": 0.0}, 0.0, 1.0) == 1.0
    assert mixing.schedule({"step": 66, "steps_per_epoch": 10, "progress": 0.66}, 1.0, 0.667) == 1.0
    assert mixing.schedule({"step": 67, "steps_per_epoch": 10, "progress": 0.67}, 1.0, 0.667) is None
    assert mixing.schedule({"step": 99, "steps_per_epoch": 10, "progress": 0.99}, 1.0, 1.0) == 1.0

    scorer, emb = FakeScorer(4), FakeEmbedder(3 * 64)
    mixer = make_timix(scorer)
    batch = image_batch(2, 8, scores=torch.randn(2, 4, 4), step=3, steps_per_epoch=12, progress=0.03)
    assert mixer.mix(ports.Forward(batch), batch, emb).gamma == pytest.approx(0.25)
    batch.update(progress=0.7)
    assert mixer.mix(ports.Forward(batch), batch, emb) is None


def test_same_seed_and_step_draw_the_same_side():
    s = 16
    lo, hi = int(0.35 * s), int(0.75 * s)
    a = make_timix(FakeScorer(s))
    resumed = make_timix(FakeScorer(s))
    other = timix_mod.build(timix_mod.TiMixParams(), {"scorer": FakeScorer(s)},
                            build_ctx("mix", 1))
    first = [a.draw_side(s, step) for step in range(60)]
    torch.manual_seed(123)  # the global RNG plays no part
    assert [resumed.draw_side(s, step) for step in range(60)] == first
    assert set(first) == set(range(lo, hi + 1))  # every side in {⌊.35S⌋..⌊.75S⌋} occurs, nothing else
    assert [other.draw_side(s, step) for step in range(60)] != first


def test_timix_params_validated():
    with pytest.raises(ValidationError, match="larger than max_ratio"):
        timix_mod.TiMixParams(min_ratio=0.8, max_ratio=0.5)
    with pytest.raises(ValidationError):
        timix_mod.TiMixParams(label="mass")
    with pytest.raises(ValidationError):
        timix_mod.TiMixParams(stop_fraction=1.5)


# ------------------------------------------------------------------------------- mixup / cutmix


def test_mixup_pairs_share_lambda_and_blend_with_the_flipped_image():
    b = 6
    batch = image_batch(b, 4)
    mixer = mixup_mod.build(mixup_mod.MixupParams(mode="pair"), {}, CTX)
    out = mixer.mix(ports.Forward(batch), batch, FakeEmbedder(48))
    x, lam = batch["images"], out.lam
    assert torch.equal(lam, lam.flip(0)) and len(set(lam[: b // 2].tolist())) == b // 2
    w = lam[:, None, None, None]
    torch.testing.assert_close(out.images, w * x + (1 - w) * x.flip(0))
    expected = torch.diag(lam) + torch.diag(1 - lam).flip(1)  # Y[i, i] = λ_i, Y[i, B-1-i] = 1 - λ_i
    torch.testing.assert_close(out.soft_targets, expected)
    # mode batch: one λ for everyone; prob 0: no mixing at all
    out = mixup_mod.build(mixup_mod.MixupParams(), {}, CTX).mix(ports.Forward(batch), batch, None)
    assert len(set(out.lam.tolist())) == 1
    assert mixup_mod.build(mixup_mod.MixupParams(prob=0.0), {}, CTX).mix(ports.Forward(batch), batch, None) is None


def test_mixup_distilled_targets():
    batch = image_batch(4, 4)
    emb = FakeEmbedder(48)
    out = mixup_mod.build(mixup_mod.MixupParams(targets="distilled"), {}, CTX).mix(ports.Forward(batch), batch, emb)
    p, lam = emb.probs(batch), out.lam[:, None]
    torch.testing.assert_close(out.soft_targets, lam * p + (1 - lam) * p.flip(0))


def test_cutmix_box_lambda_is_area_corrected():
    h = w = 8
    batch = image_batch(4, h)
    x = batch["images"]
    clipped = 0
    for step in range(40):
        batch["step"] = step
        corrected = cutmix_mod.build(cutmix_mod.CutMixParams(), {}, CTX).mix(ports.Forward(batch), batch, None)
        raw = cutmix_mod.build(cutmix_mod.CutMixParams(correct_lam=False), {}, CTX).mix(ports.Forward(batch), batch, None)
        y0, y1, x0, x1 = corrected.info["boxes"][0].tolist()
        assert torch.equal(corrected.info["boxes"], raw.info["boxes"])  # same draws
        area = (y1 - y0) * (x1 - x0)
        assert corrected.lam[0].item() == pytest.approx(1 - area / (h * w))
        # the Beta draw itself, before the box was clipped
        rng = mixing.step_rng(0, "mix", step)
        rng.random()  # the prob draw (prob 1: always mixes)
        lam_draw = rng.beta(1.0, 1.0)
        assert raw.lam[0].item() == pytest.approx(lam_draw, rel=1e-6)
        ratio = np.sqrt(1 - lam_draw)
        if area < int(h * ratio) * int(w * ratio):
            clipped += 1
            assert corrected.lam[0].item() > raw.lam[0].item()
        # inside the box: the partner's pixels; outside: the image's own
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        for i in range(4):
            assert torch.equal(corrected.images[i][:, inside], x[3 - i][:, inside])
            assert torch.equal(corrected.images[i][:, ~inside], x[i][:, ~inside])
        torch.testing.assert_close(corrected.soft_targets.sum(1), torch.ones(4))
    assert clipped > 0  # some boxes were clipped, so the correction was exercised


def test_cutmix_pair_mode_swaps_one_box_per_pair():
    batch = image_batch(6, 16, step=4)
    out = cutmix_mod.build(cutmix_mod.CutMixParams(mode="pair"), {}, CTX).mix(ports.Forward(batch), batch, None)
    boxes, x = out.info["boxes"], batch["images"]
    assert torch.equal(boxes, boxes.flip(0)) and torch.equal(out.lam, out.lam.flip(0))
    assert len({tuple(bx) for bx in boxes[:3].tolist()}) == 3  # each pair its own box
    for i in range(6):
        y0, y1, x0, x1 = boxes[i].tolist()
        assert torch.equal(out.images[i][:, y0:y1, x0:x1], x[5 - i][:, y0:y1, x0:x1])
        assert out.lam[i].item() == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_odd_batch_is_an_error(kind):
    mod = {"mixup": mixup_mod, "cutmix": cutmix_mod}[kind]
    params = mod.MixupParams() if kind == "mixup" else mod.CutMixParams()
    batch = image_batch(5, 8)
    with pytest.raises(TrialFailed, match="even batch size"):
        mod.build(params, {}, CTX).mix(ports.Forward(batch), batch, None)


def test_draw_lams_is_reproducible_and_respects_prob():
    a = mixing.draw_lams(mixing.step_rng(0, "m", 7), 1.0, 1.0, "pair", 8)
    b = mixing.draw_lams(mixing.step_rng(0, "m", 7), 1.0, 1.0, "pair", 8)
    assert np.array_equal(a, b) and np.array_equal(a, a[::-1])
    half = mixing.draw_lams(mixing.step_rng(0, "m", 7), 1.0, 0.5, "pair", 400)
    assert 0.3 < np.mean(half[:200] == 1.0) < 0.7


# ------------------------------------------------------------------------- objective.itc + mixer


class FixedMixer(ports.Mixer):
    """Returns the batch's own images with given targets and γ; counts calls."""

    def __init__(self, targets=None, gamma=1.0, steps="summed", off=False):
        self.targets, self.gamma, self.steps, self.off = targets, gamma, steps, off
        self.calls = 0

    def mix(self, fwd, batch, embedder):
        self.calls += 1
        if self.off:
            return None
        b = batch["images"].shape[0]
        t = torch.eye(b) if self.targets is None else self.targets
        return ports.MixedBatch(batch["images"].clone(), t, torch.ones(b), torch.arange(b), self.gamma)


def itc_with(mixer, **params):
    vision, text = FakeVision(), FakeText()
    obj = itc_mod.build(ITCParams(embed_dim=4, **params), {"vision": vision, "text": text, "mixer": mixer},
                        build_ctx("itc"))
    return obj, vision, text


def itc_batch(b=6):
    return make_batch(b, 4, text_len=7, step=5, steps_per_epoch=10, progress=0.1)


def test_itc_kind_takes_an_optional_mixer():
    kind = registry._KINDS["objective.itc"]
    assert kind.inputs["mixer"].optional and kind.inputs["mixer"].type_tuple == (ports.Mixer,)
    assert ITCParams().mix_weight == 1.0
    timix = registry._KINDS["mixer.timix"]
    assert issubclass(timix.output, ports.Mixer) and timix.inputs["scorer"].type_tuple == (ports.PatchScorer,)
    assert issubclass(registry._KINDS["mixer.cutmix"].output, ports.Mixer)
    assert issubclass(registry._KINDS["mixer.mixup"].output, ports.Mixer)


def test_mixed_itc_with_one_hot_targets_equals_plain_itc():
    img, txt = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    assert contrastive_loss(img, txt, 0.07, targets=torch.eye(6)).item() == pytest.approx(
        contrastive_loss(img, txt, 0.07).item(), rel=1e-6)
    # through the node: un-mixed images, one-hot targets -> mix_itc = γ · mix_weight · itc
    mixer = FixedMixer(gamma=0.5)
    obj, vision, _ = itc_with(mixer, mix_weight=3.0)
    batch = itc_batch()
    out = obj(ports.Forward(batch), batch)
    assert set(out) == {"itc", "mix_itc"} and mixer.calls == 1
    assert out["mix_itc"].item() == pytest.approx(1.5 * out["itc"].item(), rel=1e-5)
    assert vision.calls == 2  # un-mixed pass + mixed pass, each once
    assert torch.equal(batch["mixed_images/itc"], batch["images"])


def test_mixed_itc_uses_soft_targets_and_trains_through_the_mixed_images():
    b = 6
    targets = torch.softmax(torch.randn(b, b), 1)
    obj, vision, text = itc_with(FixedMixer(targets=targets))
    batch = itc_batch(b)
    fwd = ports.Forward(batch)
    out = obj(fwd, batch)
    v_mix = obj.embed_images(fwd, images_key="mixed_images/itc")
    ref = contrastive_loss(v_mix, obj.embed_texts(fwd), obj.temperature, targets=targets)
    assert out["mix_itc"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert abs(out["mix_itc"].item() - out["itc"].item()) > 1e-4
    out["mix_itc"].backward()
    assert vision.proj.weight.grad is not None and text.emb.weight.grad is not None


def test_itc_without_a_mixer_or_with_mixing_off():
    obj, _, _ = itc_with(None)
    batch = itc_batch()
    assert obj.step_groups == ("main",) and set(obj(ports.Forward(batch), batch)) == {"itc"}
    assert set(obj(ports.Forward(batch), batch, group="main")) == {"itc"}
    off = FixedMixer(off=True)
    obj, vision, _ = itc_with(off)
    assert set(obj(ports.Forward(batch), batch)) == {"itc"} and off.calls == 1 and vision.calls == 1


def test_separate_steps_give_two_groups():
    mixer = FixedMixer(steps="separate")
    obj, _, _ = itc_with(mixer)
    assert obj.step_groups == ("main", "mix")
    batch = itc_batch()
    assert set(obj(ports.Forward(batch), batch, group="main")) == {"itc"} and mixer.calls == 0
    assert set(obj(ports.Forward(batch), batch, group="mix")) == {"mix_itc"} and mixer.calls == 1
    assert set(obj(ports.Forward(batch), batch)) == {"itc", "mix_itc"}
    # summed: the mixed term joins "main", also when other objectives make the trial call groups by name
    summed = FixedMixer()
    obj, _, _ = itc_with(summed)
    assert obj.step_groups == ("main",)
    assert set(obj(ports.Forward(batch), batch, group="main")) == {"itc", "mix_itc"} and summed.calls == 1


def test_timix_through_itc_uses_the_objectives_own_prediction():
    b, s = 4, 2  # FakeVision: 4×4 images, 2×2 patches of 2 px
    batch = itc_batch(b)
    batch["scores"] = torch.randn(b, s, s)
    scorer = FakeScorer(s)
    mixer = make_timix(scorer, min_ratio=0.5, max_ratio=0.5, ramp_epochs=0.0)
    obj, vision, text = itc_with(mixer)
    fwd = ports.Forward(batch)
    out = obj(fwd, batch)
    assert set(out) == {"itc", "mix_itc"} and scorer.calls == 1
    assert (vision.calls, text.calls) == (2, 1)  # P reuses the un-mixed pass
    with torch.no_grad():
        p = torch.softmax(obj.embed_images(fwd) @ obj.embed_texts(fwd).T / obj.temperature, 1)
    mixed = mixer.mix(ports.Forward(batch), batch, obj)
    torch.testing.assert_close(mixed.soft_targets, 0.75 * p + 0.25 * p.flip(0))
    ref = contrastive_loss(obj.embed_images(fwd, "mixed_images/itc"), obj.embed_texts(fwd), obj.temperature,
                           targets=mixed.soft_targets)
    assert out["mix_itc"].item() == pytest.approx(ref.item(), rel=1e-5)


# ------------------------------------------------------------------------------------- in a graph

def mixing_graph(tmp_path, mixer: str, mixer_inputs: dict | None = None):
    """g.yaml: ITC with ``mixer`` (its inputs ``mixer_inputs``) taking a step of its own, 3 steps at 16 px."""
    return tiny_graph(tmp_path, "g.yaml", graph="mixing", nodes={
        "shapes": shapes(train_size=128, image_size=16), "vision": vit(image_size=16, patch_size=4, width=16),
        "text": text(width=16, max_len=24), "mix": node(mixer, mixer_inputs, steps="separate"),
        "itc": itc(mixer="mix", embed_dim=16),
        "train": trainer("itc", epochs=None, max_steps=3, warmup_steps=1, log_every=1, checkpoint_every=0)})


def test_timix_scorer_input_is_type_checked(tmp_path):
    from vlpgraph.errors import UserError
    from vlpgraph.engine.sweep import load_experiment

    path = mixing_graph(tmp_path, "mixer.timix", {"scorer": "text"})
    with pytest.raises(UserError, match="input 'scorer' expects PatchScorer"):
        load_experiment(path)


@pytest.mark.integration
def test_trainer_takes_a_separate_mixed_step(tmp_path):
    from vlpgraph.engine.compile import compile_trial
    from vlpgraph.engine.sweep import load_experiment
    from vlpgraph.execution.train import Hooks, fit

    path = mixing_graph(tmp_path, "mixer.cutmix")
    plan = compile_trial(load_experiment(path).trials[0], tmp_path / "cache", torch.device("cpu"), log=lambda m: None)
    assert plan.model.objectives["itc"].step_groups == ("main", "mix")
    rows: list[dict] = []
    fit(plan.model, 0, None, Hooks(on_metrics=rows.extend))
    logged = {r["name"] for r in rows}
    assert {"itc", "mix_itc"} <= logged
