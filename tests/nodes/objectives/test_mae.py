"""Masked image modelling: vlpgraph.layers.masking, encoder.vit's masked forward, objective.mae and
evaluator.reconstruction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import TINY_TRAIN, build_ctx, evaluator, mae, make_batch, shapes, tiny_graph, trainer, vit
from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers import masking
from vlpgraph.nodes.encoders.vit import ViTParams, build_vit
from vlpgraph.nodes.evaluators import reconstruction as recon_mod
from vlpgraph.nodes.objectives import mae as mae_mod

CTX = build_ctx("recon")


def _tower(patch: int = 8, size: int = 32, width: int = 32, depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return build_vit(ViTParams(patch_size=patch, width=width, depth=depth, heads=2), size)


def _mae(tower, **params) -> mae_mod.MAE:
    torch.manual_seed(1)
    return mae_mod.MAE(tower, mae_mod.MAEParams(decoder_depth=1, decoder_width=32, decoder_heads=2, **params),
                       seed=0, node="mae")


def _batch(n: int = 6, size: int = 32, step: int = 3, ids=None) -> dict:
    ids = torch.arange(100, 100 + n) if ids is None else torch.as_tensor(ids)
    return make_batch(len(ids), size, 7, sample_ids=ids, step=step)


# ----------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("n, ratio", [(16, 0.75), (64, 0.75), (49, 0.6), (10, 0.99)])
def test_visible_count_per_sample_is_round_one_minus_ratio_times_n(n, ratio):
    ids_keep, mask = masking.random_masking(0, "mae", 5, range(8), n, ratio)
    v = max(1, round((1 - ratio) * n))
    assert ids_keep.shape == (8, v) and ids_keep.dtype == torch.long
    assert mask.shape == (8, n)
    assert (mask.sum(1) == n - v).all()
    assert (ids_keep.diff(dim=1) > 0).all()  # sorted ascending, no repeats
    # the mask marks exactly the patches not kept
    assert (mask.gather(1, ids_keep) == 0).all()


def test_masks_differ_across_samples_and_steps_and_repeat_for_the_same_draw():
    ids_keep, _ = masking.random_masking(0, "mae", 5, range(8), 64, 0.75)
    assert len({tuple(r.tolist()) for r in ids_keep}) == 8
    again, _ = masking.random_masking(0, "mae", 5, range(8), 64, 0.75)
    assert torch.equal(ids_keep, again)
    other_step, _ = masking.random_masking(0, "mae", 6, range(8), 64, 0.75)
    assert all(not torch.equal(a, b) for a, b in zip(ids_keep, other_step))
    other_seed, _ = masking.random_masking(1, "mae", 5, range(8), 64, 0.75)
    assert all(not torch.equal(a, b) for a, b in zip(ids_keep, other_seed))


def test_a_sample_masks_the_same_whatever_else_its_batch_holds():
    alone, _ = masking.random_masking(0, "mae", 5, [42], 64, 0.75)
    among, _ = masking.random_masking(0, "mae", 5, [7, 3, 42, 9], 64, 0.75)
    assert torch.equal(alone[0], among[2])


def test_masking_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    masking.random_masking(0, "mae", 5, range(8), 64, 0.75)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------ patches, targets


def test_patchify_roundtrip_and_patch_order():
    images = torch.randn(2, 3, 16, 24)
    patches = masking.patchify(images, 4)
    assert patches.shape == (2, 4 * 6, 4 * 4 * 3)
    # patch n = row * S_w + col; values ordered (pixel row, pixel col, channel)
    row, col = 2, 5
    expected = images[1, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, row * 6 + col], expected)
    assert torch.equal(masking.unpatchify(patches, 4, (4, 6)), images)


def test_norm_pix_targets_have_per_patch_mean_zero_and_var_one():
    patches = masking.patchify(torch.rand(3, 3, 16, 16) * 5 + 2, 4)
    t = masking.norm_pix_targets(patches)
    assert t.mean(-1).abs().max() < 1e-5
    assert (t.var(-1) - 1).abs().max() < 1e-3
    # and the visualisation's inverse recovers the pixels
    assert torch.allclose(masking.denorm_pix(t, patches), patches, atol=1e-5)


def test_paint_masked_greys_exactly_the_masked_patches():
    images = torch.rand(1, 3, 8, 8)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # 2x2 grid of 4-px patches
    out = masking.paint_masked(images, mask, 4)
    assert (out[0, :, :4, :4] == 0.5).all() and (out[0, :, 4:, 4:] == 0.5).all()
    assert torch.equal(out[0, :, :4, 4:], images[0, :, :4, 4:])
    assert torch.equal(out[0, :, 4:, :4], images[0, :, 4:, :4])


# ------------------------------------------------------------------------------- masked forward


def test_masked_forward_runs_the_blocks_on_visible_tokens_only():
    tower = _tower()
    seen = []
    tower.vit.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    ids_keep, _ = masking.random_masking(0, "mae", 0, range(4), 16, 0.75)
    out = tower.forward_masked(torch.randn(4, 3, 32, 32), ids_keep)
    assert seen == [1 + 4]
    assert out.shape == (4, 1 + 4, tower.width)


def test_masked_forward_with_every_patch_equals_the_normal_forward():
    tower = _tower().eval()
    images = torch.randn(3, 3, 32, 32)
    ids = torch.arange(16).expand(3, 16)
    assert torch.allclose(tower.forward_masked(images, ids), tower(images), atol=1e-6)


def test_masked_forward_depends_only_on_the_visible_patches():
    tower = _tower().eval()
    images = torch.randn(2, 3, 32, 32)
    ids_keep, mask = masking.random_masking(0, "mae", 0, range(2), 16, 0.75)
    changed = images.clone()
    hidden = mask[0].nonzero()[0].item()
    r, c = divmod(hidden, 4)
    changed[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 3.0
    assert torch.equal(tower.forward_masked(images, ids_keep), tower.forward_masked(changed, ids_keep))


# ---------------------------------------------------------------------------------- objective.mae


def test_mae_loss_ignores_predictions_at_visible_patches():
    mae = _mae(_tower())
    batch = _batch()
    fwd = ports.Forward(batch)
    enc = mae.masked_encoding(fwd)
    target = mae.targets(batch["images"])
    pred = torch.randn_like(target)
    base, _ = masking.masked_patch_errors(pred, target, enc.mask)
    at_visible = pred.clone()
    b, n = (enc.mask == 0).nonzero()[0].tolist()
    at_visible[b, n] += 10.0
    assert masking.masked_patch_errors(at_visible, target, enc.mask)[0] == base
    at_masked = pred.clone()
    b, n = (enc.mask == 1).nonzero()[0].tolist()
    at_masked[b, n] += 10.0
    assert masking.masked_patch_errors(at_masked, target, enc.mask)[0] != base
    # and the objective's own loss is this function of its reconstruction
    expected, _ = masking.masked_patch_errors(mae.reconstruct(fwd), target, enc.mask)
    assert torch.equal(mae(fwd, batch)["mae"], expected)


def test_mae_uses_norm_pix_targets_only_when_asked():
    tower = _tower()
    images = _batch()["images"]
    on, off = _mae(tower).targets(images), _mae(tower, norm_pix=False).targets(images)
    assert torch.equal(off, masking.patchify(images, 8))
    assert torch.allclose(on, masking.norm_pix_targets(masking.patchify(images, 8)))


def test_masked_encoding_is_computed_once_per_forward():
    tower = _tower()
    mae = _mae(tower)
    calls = []
    tower.vit.blocks[0].register_forward_hook(lambda m, args, out: calls.append(1))
    fwd = ports.Forward(_batch())
    first = mae.masked_encoding(fwd)
    mae(fwd, fwd.batch)  # the objective's own loss
    assert mae.masked_encoding(fwd) is first  # another objective (objective.caption) on the same step
    mae.reconstruct(fwd)
    assert len(calls) == 1
    mae.masked_encoding(ports.Forward(_batch()))  # a new step's Forward encodes again
    assert len(calls) == 2


def test_mae_masks_follow_the_batch_step_and_sample_ids():
    mae = _mae(_tower())
    a = mae.masked_encoding(ports.Forward(_batch(step=3, ids=[5, 6, 7])))
    b = mae.masked_encoding(ports.Forward(_batch(step=3, ids=[9, 5])))
    c = mae.masked_encoding(ports.Forward(_batch(step=4, ids=[5, 6, 7])))
    assert torch.equal(a.ids_keep[0], b.ids_keep[1])
    assert not torch.equal(a.ids_keep[0], c.ids_keep[0])
    assert a.tokens.shape == (3, 1 + 4, 32)


def test_mae_trains_the_decoder_and_the_tower():
    tower = _tower()
    mae = _mae(tower)
    batch = _batch()
    mae(ports.Forward(batch), batch)["mae"].backward()
    assert tower.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.decoder.mask_token.grad.abs().sum() > 0
    # the tower is held by reference, not registered twice
    assert not any(k.startswith("_refs") or "vit." in k for k in mae.state_dict())


def test_mae_refuses_a_tower_without_a_masked_forward():
    class Plain(ports.VisionTower):
        width, patch_size, grid_size = 8, 4, (2, 2)

        def forward(self, images):
            return torch.zeros(images.shape[0], 5, 8)

    ctx = build_ctx("mae")
    with pytest.raises(UserError, match="no masked forward"):
        mae_mod.build(mae_mod.MAEParams(), {"vision": Plain()}, ctx)


# ------------------------------------------------------------------------ evaluator.reconstruction


class _Split(torch.utils.data.Dataset):
    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(3)
        self.images = torch.randn(n, 3, 32, 32, generator=gen)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": f"caption {i}", "sample_id": 500 + i}


class _Data(ports.PairedData):
    def __init__(self):
        self.train, self.test = _Split(4), _Split(12)


class _Model(ports.Model):
    def __init__(self, tower, mae, data):
        self.modules = nn.ModuleDict({"vision": tower, "mae": mae})
        self.objectives = {"mae": mae}
        self.data, self.tokenizer, self.device, self.params = data, None, torch.device("cpu"), None


def test_reconstruction_evaluator_is_repeatable_and_leaves_weights_untouched():
    tower = _tower()
    mae = _mae(tower)
    data = _Data()
    model = _Model(tower, mae, data)
    model.modules.train()
    before = {k: v.clone() for k, v in model.modules.state_dict().items()}
    ev = recon_mod.build(recon_mod.ReconstructionParams(batch_size=5, num_samples=3), {"data": data, "mae": mae}, CTX)
    torch.manual_seed(9)
    rng = torch.get_rng_state()
    first = ev.evaluate(model, CTX)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is untouched
    second = ev.evaluate(model, CTX)
    after = model.modules.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules.modules())  # train flags restored
    assert first.metrics == second.metrics and first.metrics["n"] == 12
    # the metric is the objective's loss on the test split under the evaluation masks
    batch = data.collate([data.test[i] for i in range(12)])
    batch.update(step=recon_mod.EVAL_STEP, mask_seed=0)
    with torch.no_grad():
        mae.eval()
        loss = mae(ports.Forward(batch), batch)["mae"].item()
    assert first.metrics["mse"] == pytest.approx(loss, rel=1e-5)
    rows = first.samples
    assert [r["sample_id"] for r in rows] == [500, 501, 502]
    assert {r["kind"] for r in rows} == {"reconstruction"}
    for r in rows:
        assert r["reference"].startswith("caption ")
        for key in ("image", "masked_image", "output_image"):
            assert r[key][:8] == b"\x89PNG\r\n\x1a\n"
        assert r["info"]["mask_ratio"] == 0.75 and r["info"]["mse"] > 0
    assert rows[0]["image"] != rows[0]["masked_image"] != rows[0]["output_image"]


def test_reconstruction_output_pastes_visible_patches_from_the_input():
    images = torch.rand(2, 3, 16, 16)
    ids_keep, mask = masking.random_masking(0, "mae", 0, range(2), 16, 0.75)
    predicted = torch.randn(2, 16, 4 * 4 * 3)
    out = masking.paste_reconstruction(images, predicted, mask, 4, norm_pix=True)
    patches_in, patches_out = masking.patchify(images, 4), masking.patchify(out, 4)
    visible = mask == 0
    assert torch.equal(patches_out[visible], patches_in[visible])
    expected = masking.denorm_pix(predicted, patches_in)
    assert torch.allclose(patches_out[~visible], expected[~visible], atol=1e-6)


# --------------------------------------------------------------------------------- end to end

MAE_GRAPH = tiny_graph(graph="tiny_mae", nodes={
    "shapes": shapes(test_size=16, image_size=32), "vision": vit(), "mae": mae(),
    "train": trainer("mae", **{**TINY_TRAIN, "warmup_steps": 1, "checkpoint_every": 0}),
    "reconstruction": evaluator("reconstruction", inputs={"mae": "mae"}, num_samples=4)})


@pytest.mark.integration
def test_tiny_mae_graph_trains_and_writes_reconstructions(tmp_path: Path):
    from vlpgraph.cli import main
    from vlpgraph.store import Store

    graph = tmp_path / "mae.yaml"
    graph.write_text(MAE_GRAPH)
    assert main(["run", str(graph), "--store", str(tmp_path / "store")]) == 0
    store = Store(tmp_path / "store")
    (run,) = store.runs()
    assert run["status"] == "completed"
    losses = [m for m in store.metrics(run["run_id"]) if m["name"] == "mae"]
    assert len(losses) == 4 and all(m["value"] > 0 for m in losses)
    evals = {(e["evaluator"], e["metric"]): e["value"] for e in store.evals([run["run_id"]])}
    assert evals[("reconstruction", "mse")] > 0 and evals[("reconstruction", "n")] == 16
    rows = store.samples(run["run_id"], kind="reconstruction")
    assert [r["sample_id"] for r in rows] == sorted(r["sample_id"] for r in rows) and len(rows) == 4
    assert all(r["evaluator"] == "reconstruction" and r["output_image"] for r in rows)
    assert json.loads(rows[0]["info"])["mask_ratio"] == 0.75


def test_mae_decoder_attention_goes_through_attend(monkeypatch):
    from vlpgraph.layers import attention

    mae = _mae(_tower(), attention="math")
    backends = []
    real = attention.attend

    def spy(*a, **kw):
        backends.append(a[5])
        return real(*a, **kw)

    monkeypatch.setattr(attention, "attend", spy)
    mae.decoder(torch.randn(2, 5, 32), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
    assert backends == ["math"]  # one decoder block, its attention routed with the node's backend
