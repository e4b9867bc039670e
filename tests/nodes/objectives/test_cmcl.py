"""objective.cmcl: the symmetric InfoNCE between a sentence and its cross-modal CutMix view."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import build_ctx
from tests.nodes.mixers.test_cmc import caption_batch, make_captions, make_mixer
from vlpgraph.engine import ports, registry
from vlpgraph.errors import UserError
from vlpgraph.nodes.objectives import cmcl as cmcl_mod
from vlpgraph.nodes.objectives import mlm as mlm_mod


def features(b: int = 8, d: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1)


def test_identical_views_have_the_minimum_loss():
    a = features()
    same = cmcl_mod.symmetric_infonce(a, a, 0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        perm = torch.randperm(8, generator=g)
        if torch.equal(perm, torch.arange(8)):
            continue
        assert same < cmcl_mod.symmetric_infonce(a, a[perm], 0.1)
    # a view near the sentence scores between the two
    near = F.normalize(a + 0.3 * features(seed=2), dim=-1)
    assert same < cmcl_mod.symmetric_infonce(a, near, 0.1) < cmcl_mod.symmetric_infonce(a, a.roll(1, 0), 0.1)
    # with a low temperature the identical pairing reaches the log-minimum (0); the uniform one is log B
    assert cmcl_mod.symmetric_infonce(a, a, 0.01) < 1e-3
    assert cmcl_mod.symmetric_infonce(a, a, 1e4) == pytest.approx(math.log(8), abs=1e-3)


def test_loss_is_symmetric_in_its_two_sides():
    a, b = features(seed=3), features(seed=4)
    assert cmcl_mod.symmetric_infonce(a, b, 0.2) == pytest.approx(float(cmcl_mod.symmetric_infonce(b, a, 0.2)))


def make_cmcl(p: float = 1.0, **params):
    mixer, text, vision, data = make_mixer(p=p)
    obj = cmcl_mod.build(cmcl_mod.CMCLParams(embed_dim=8, **params), {"text": text, "mixer": mixer}, build_ctx("cmcl"))
    return obj, mixer, text


class FixedMixer(ports.TextMixer):
    """Returns the plain sentences' word embeddings as the view, its rows in ``order``."""

    def __init__(self, text, order=None):
        super().__init__()
        self._text = (text,)
        self.order = order

    @property
    def text(self):
        return self._text[0]

    def mix(self, fwd, batch, text=None, vision=None):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.order is not None:
            ids, mask = ids[self.order], mask[self.order]
        embeds = self.text.bert.get_input_embeddings()(ids)
        return ports.CMCBatch(embeds, mask, ids, torch.zeros_like(mask, dtype=torch.bool), [[] for _ in ids], 0.0)


def test_objective_scores_identical_views_lowest():
    _, _, text = make_cmcl()
    text.eval()  # no dropout: identical views give identical features
    captions, _ = make_captions(8, seed=9)
    batch = caption_batch(text, captions)
    losses = {}
    for name, order in (("same", None), ("roll", torch.arange(8).roll(1)), ("swap", torch.tensor([1, 0, *range(2, 8)]))):
        torch.manual_seed(0)  # the same projection each time
        obj = cmcl_mod.build(cmcl_mod.CMCLParams(embed_dim=8), {"text": text, "mixer": FixedMixer(text, order)},
                             build_ctx("cmcl"))
        plain, view = obj.features(ports.Forward(batch))
        if order is None:
            torch.testing.assert_close(plain, view, rtol=1e-5, atol=1e-6)
        losses[name] = float(obj(ports.Forward(batch), batch)["cmcl"].detach())
    assert losses["same"] < losses["swap"] and losses["same"] < losses["roll"]


def test_objective_trains_projection_temperature_mixer_and_towers():
    obj, mixer, text = make_cmcl(p=1.0)
    captions, _ = make_captions(12, seed=2)
    batch = caption_batch(text, captions)
    out = obj(ports.Forward(batch), batch)
    assert set(out) == {"cmcl"} and torch.isfinite(out["cmcl"])
    out["cmcl"].backward()
    for name, q in (("proj", obj.proj.weight), ("temp", obj.temp), ("mixer.proj", mixer.proj.weight),
                    ("visual_type", mixer.visual_type)):
        assert q.grad is not None and q.grad.abs().sum() > 0, name
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in mixer.vision.parameters())


def test_mlm_and_cmcl_share_one_mixed_view_per_step():
    obj, mixer, text = make_cmcl(p=1.0)
    mlm = mlm_mod.build(mlm_mod.MLMParams(), {"mixer": mixer}, build_ctx("mlm"))
    captions, _ = make_captions(12, seed=2)
    batch = caption_batch(text, captions)
    fwd = ports.Forward(batch)
    calls = mixer.gallery.calls
    terms = {**mlm(fwd, batch), **obj(fwd, batch)}
    regions = sum(map(len, mixer.mix(fwd, batch).spans))
    assert mixer.gallery.calls - calls == regions  # the regions were read (and embedded) once
    assert set(terms) == {"mlm", "cmcl"}


def test_fixed_temperature_and_clamp():
    obj, _, text = make_cmcl(learn_temperature=False, temperature=0.2)
    assert not isinstance(obj.temp, torch.nn.Parameter) and float(obj.temperature) == pytest.approx(0.2)
    learned, _, _ = make_cmcl()
    with torch.no_grad():
        learned.temp.fill_(5.0)
    assert float(learned.temperature.detach()) == pytest.approx(0.5)  # temperature_max
    with pytest.raises(ValueError, match="temperature"):
        cmcl_mod.CMCLParams(temperature=0.9)


def test_text_tower_must_be_the_mixers():
    mixer, text, _, _ = make_mixer()
    other, _, _, _ = make_mixer()
    with pytest.raises(UserError, match="same encoder.text"):
        cmcl_mod.build(cmcl_mod.CMCLParams(), {"text": other.text, "mixer": mixer}, build_ctx("cmcl"))


def test_kind_is_registered():
    kind = registry.get("objective.cmcl")
    assert set(kind.inputs) == {"text", "mixer"} and kind.inputs["mixer"].types is ports.TextMixer
    assert "'cmcl'" in kind.doc


class UnpairedTrain(torch.utils.data.Dataset):
    """Items as the contract's unpaired train split: image and caption from different scenes."""

    def __init__(self, captions):
        self.captions = captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, 16, 16, generator=g), "image_id": 1000 + i, "caption": self.captions[i],
                "text_id": i, "sample_id": i}


def vlmixer_job(tmp_path, max_steps: int):
    """A trainer job over fake unpaired data with objective.mlm and objective.cmcl on one mixer.cmc,
    built as compile does (modules from the upstream nodes); the same weights at every call."""
    from vlpgraph.nodes import trainer as trainer_mod

    torch.manual_seed(0)
    mixer, text, vision, data = make_mixer(p=0.5)
    captions, _ = make_captions(32, seed=4)
    data.train = UnpairedTrain(captions)
    mlm = mlm_mod.build(mlm_mod.MLMParams(), {"mixer": mixer}, build_ctx("mlm"))
    obj = cmcl_mod.build(cmcl_mod.CMCLParams(embed_dim=8), {"text": text, "mixer": mixer}, build_ctx("cmcl"))
    upstream = {"data": data, "vision": vision, "text": text, "cmc": mixer, "mlm": mlm, "cmcl": obj}
    params = trainer_mod.TrainerParams(max_steps=max_steps, batch_size=8, warmup_steps=0, checkpoint_every=0,
                                       log_every=1)
    train_ctx = build_ctx("train", cache=tmp_path, upstream=upstream)
    return trainer_mod.build(params, {"data": data, "objectives": {"mlm": mlm, "cmcl": obj}}, train_ctx), mixer


@pytest.mark.integration
def test_trainer_trains_the_mixer_and_a_resumed_run_mixes_the_same(tmp_path):
    from vlpgraph.execution import train
    from vlpgraph.errors import Interrupted

    job, mixer = vlmixer_job(tmp_path, 4)
    assert "cmc" in job.modules  # the mixer's projection and type embedding are trained with the rest
    before = mixer.proj.weight.detach().clone(), mixer.visual_type.detach().clone()
    rows = []
    result = train.fit(job, seed=0, checkpoints=train.Checkpointer(tmp_path / "a"),
                       hooks=train.Hooks(on_metrics=rows.extend))
    assert result.step == 4
    assert {"mlm", "cmcl"} <= {r["name"] for r in rows}
    assert not torch.equal(mixer.proj.weight, before[0]) and not torch.equal(mixer.visual_type, before[1])

    # stopped after 2 steps, resumed from the checkpoint: the same mixed sentences, the same weights
    steps = []
    first, _ = vlmixer_job(tmp_path, 4)
    with pytest.raises(Interrupted):
        train.fit(first, seed=0, checkpoints=train.Checkpointer(tmp_path / "b"),
                  hooks=train.Hooks(on_step=lambda step, *_: steps.append(step), should_stop=lambda: len(steps) == 2))
    resumed, again = vlmixer_job(tmp_path, 4)
    assert train.fit(resumed, seed=0, checkpoints=train.Checkpointer(tmp_path / "b")).resumed_from == 2
    torch.testing.assert_close(again.proj.weight, mixer.proj.weight, rtol=0, atol=1e-6)
