"""evaluator.reconstruction: an MAE's masked-patch reconstruction error on the test split, and pictures of it."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.nodes.evaluators.evaluation import evaluation_mode, seeded, to_device
from vlpgraph.layers.masking import masked_patch_errors, norm_pix_targets, paint_masked, paste_reconstruction, patchify
from vlpgraph.layers.patches import png_bytes
from vlpgraph.engine.registry import In, Params, register

# The step the evaluation masks are drawn at: training steps are >= 0, so they never coincide.
EVAL_STEP = -1


class ReconstructionParams(Params):
    batch_size: int = Field(256, ge=1, description="test images reconstructed per forward pass")
    max_samples: int | None = Field(None, ge=1, description="score only the first N test samples (None: all)")
    num_samples: int = Field(8, ge=0, description="write this many test samples (the first ones) to the store's "
                             "samples table: image, masked view, reconstruction")
    seed: int = Field(0, description="seed of the evaluation masks (with a fixed step): every evaluation of every "
                      "trial hides the same patches of a test image")



class ReconstructionEvaluator(ports.Evaluator):
    """MSE on the masked patches of the test split, and reconstructions of a few samples; see :func:`build`."""

    headline = "mse"

    def __init__(self, params: ReconstructionParams, data: ports.PairedData, mae: ports.MaskedImageModel):
        self.params = params
        self.data = data
        self.mae = mae

    def _batch(self, items: list[dict], device) -> dict:
        batch = to_device(self.data.collate(items), device)
        batch.update(step=EVAL_STEP, mask_seed=self.params.seed)
        return batch

    def _scored(self, fwd: ports.Forward):
        """(masked encoding, predictions [B, N, p*p*3], per-sample MSE [B]) of one batch, through the
        MaskedImageModel port; targets as the MAE's own (``norm_pix``/``norm_pix_eps``: objective.mae's
        attributes, normalised-pixel targets when a model does not say)."""
        mae = self.mae
        enc = mae.masked_encoding(fwd)
        predicted = mae.reconstruct(fwd).float()
        patches = patchify(fwd.batch["images"].float(), mae.vision.patch_size)
        norm_pix, eps = getattr(mae, "norm_pix", True), getattr(mae, "norm_pix_eps", 1e-6)
        target = norm_pix_targets(patches, eps) if norm_pix else patches
        return enc, predicted, masked_patch_errors(predicted, target, enc.mask)[1]

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p, data, mae = self.params, self.data, self.mae
        test = data.test
        n_total = len(test) if p.max_samples is None else min(len(test), p.max_samples)
        device = model.device
        per_sample: list[torch.Tensor] = []
        rows: list[dict] = []
        mae_modules = [m for m in (mae, mae.vision) if isinstance(m, nn.Module)]
        with seeded(ctx), evaluation_mode(model, *mae_modules):
            for start in range(0, n_total, p.batch_size):
                batch = self._batch([test[i] for i in range(start, min(n_total, start + p.batch_size))], device)
                fwd = ports.Forward(batch)
                per_sample.append(self._scored(fwd)[2].float().cpu())
            if p.num_samples:
                rows = self._rows(min(len(test), p.num_samples), device)
        mse = torch.cat(per_sample) if per_sample else torch.zeros(0)
        # every sample hides the same number of patches, so the mean of per-sample means is the loss over all
        metrics = {"mse": mse.mean().item() if mse.numel() else float("nan"), "n": float(mse.numel())}
        return ports.EvalResult(metrics=metrics, samples=rows)

    def _rows(self, n: int, device) -> list[dict]:
        data, mae = self.data, self.mae
        batch = self._batch([data.test[i] for i in range(n)], device)
        enc, predicted, errs = self._scored(ports.Forward(batch))
        images = batch["images"].float()
        p = mae.vision.patch_size
        original = data.denormalize(images).cpu()
        masked = paint_masked(original, enc.mask.cpu(), p)
        output = paste_reconstruction(images, predicted, enc.mask, p, norm_pix=getattr(mae, "norm_pix", True),
                                      eps=getattr(mae, "norm_pix_eps", 1e-6))
        output = data.denormalize(output).cpu()
        rows = []
        for i in range(n):
            rows.append({
                "kind": "reconstruction",
                "sample_id": int(batch["sample_ids"][i]),
                "reference": batch["captions"][i] if "captions" in batch else None,
                "image": png_bytes(original[i]),
                "masked_image": png_bytes(masked[i]),
                "output_image": png_bytes(output[i]),
                "info": {"mask_ratio": float(enc.mask[i].float().mean()), "mse": float(errs[i])},
            })
        return rows


@register(
    "evaluator.reconstruction",
    params=ReconstructionParams,
    output=ReconstructionEvaluator,
    inputs={
        "model": In(ports.Model, doc="the trained model"),
        "data": In(ports.PairedData, doc="its test split is reconstructed"),
        "mae": In(ports.MaskedImageModel, doc="the masked image model to evaluate (objective.mae)"),
    },
)
def build(params: ReconstructionParams, inputs: dict, ctx: ports.BuildContext) -> ReconstructionEvaluator:
    """MAE reconstruction on the test split: metric mse (the objective's loss: squared error over the
    masked patches, normalised-pixel targets when the MAE uses norm_pix) over the first `max_samples`
    test samples, and n (samples scored).

    The masks are drawn as in training but with the evaluator's `seed` and a fixed step (-1), so every
    evaluation (mid-training and final) of every trial hides the same patches of a test image and the
    numbers compare. It also writes the first `num_samples` test samples to the store's samples table
    (kind 'reconstruction'): image (the input), masked_image (the visible patches, masked ones grey),
    output_image (MAE's visualisation: visible patches from the input, masked ones from the decoder,
    un-normalised with each true patch's mean and variance when norm_pix), reference (the caption),
    info {mask_ratio, mse of that sample}. Runs in eval mode without gradients; no weight changes.
    """
    return ReconstructionEvaluator(params, inputs["data"], inputs["mae"])
