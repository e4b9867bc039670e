"""evaluator.mixing: what a text mixer (mixer.cmc, cross-modal CutMix) makes of held-out sentences — the
rate it replaces concept spans at, and a few mixed test sentences for the app's Samples page."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.nodes.evaluators.evaluation import evaluation_mode, seeded, to_device, tokenize
from vlpgraph.engine.registry import In, Params, register

# The step the evaluation draws are made at: training steps are >= 0, so they never coincide.
EVAL_STEP = -1


class MixingParams(Params):
    batch_size: int = Field(64, ge=1, description="test sentences mixed per pass (the sample rows' regions go "
                            "through the vision tower in one pass per batch)")
    max_samples: int | None = Field(512, ge=1, description="the metrics count the draws over the first N test "
                                    "sentences (None: all)")
    num_samples: int = Field(8, ge=0, description="mix the first N test sentences and write those with a replaced "
                             "span to the store's samples table (kind 'cmc')")
    seed: int = Field(0, description="seed of the evaluation draws (with a fixed step), in place of the trial's: "
                      "every evaluation of every trial mixes the same test sentences the same way")



class MixingEvaluator(ports.Evaluator):
    """Counts a mixer's draws on the test sentences and stores a few mixed ones; see :func:`build`."""

    headline = None  # a check of the mixer, not a score of the model

    def __init__(self, params: MixingParams, data: ports.PairedData, mixer: ports.TextMixer):
        self.params, self.data, self.mixer = params, data, mixer

    def _batch(self, indices: range, device) -> dict:
        """The test sentences ``indices`` tokenised by the mixer's text tower, with their sample ids, the
        fixed step and the evaluator's seed (what mixer.cmc draws from)."""
        items = [self.data.test[i] for i in indices]
        captions = [it["caption"] for it in items]
        batch = tokenize(self.mixer.text.tokenizer, captions, "evaluator.mixing")
        batch.update(captions=captions, sample_ids=torch.tensor([int(it["sample_id"]) for it in items]),
                     step=EVAL_STEP, mix_seed=self.params.seed)
        return to_device(batch, device)

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p, mixer, test = self.params, self.mixer, self.data.test
        n_total = len(test) if p.max_samples is None else min(len(test), p.max_samples)
        device = model.device
        candidates = replaced = 0
        rows: list[dict] = []
        towers = [m for m in (mixer, mixer.vision, mixer.text) if isinstance(m, nn.Module)]
        with seeded(ctx), evaluation_mode(model, *towers):
            for start in range(0, n_total, p.batch_size):
                batch = self._batch(range(start, min(n_total, start + p.batch_size)), device)
                lengths = batch["attention_mask"].sum(1).tolist()
                for ids, n, sid in zip(batch["input_ids"].tolist(), lengths, batch["sample_ids"].tolist()):
                    spans, chosen = mixer.draw(ids[:n], EVAL_STEP, int(sid), p.seed)
                    candidates += len(spans)
                    replaced += sum(rid is not None for rid in chosen)
            # the first num_samples sentences (those with a replaced span), mixed as in training
            for start in range(0, min(len(test), p.num_samples), p.batch_size):
                batch = self._batch(range(start, min(len(test), p.num_samples, start + p.batch_size)), device)
                rows += mixer.sample_rows(batch, limit=len(batch["captions"]))
        metrics = {"rate": replaced / candidates if candidates else float("nan"),
                   "candidates_per_sentence": candidates / n_total if n_total else float("nan"),
                   "n": float(n_total)}
        return ports.EvalResult(metrics=metrics, samples=rows)


@register(
    "evaluator.mixing",
    params=MixingParams,
    output=MixingEvaluator,
    inputs={
        "model": In(ports.Model, doc="the trained model (put in eval mode while mixing)"),
        "data": In(ports.PairedData, doc="its test captions are mixed"),
        "mixer": In(ports.TextMixer, doc="the mixer to look at (mixer.cmc): needs draw() and sample_rows()"),
    },
)
def build(params: MixingParams, inputs: dict, ctx: ports.BuildContext) -> MixingEvaluator:
    """Cross-modal CutMix on held-out text: metrics rate (replaced concept spans / candidate concept spans
    over the first `max_samples` test sentences — it should be the mixer's p: a check that CMC mixes unseen
    sentences as it mixes the training text), candidates_per_sentence (concept spans a test sentence has:
    how much of the text CMC can reach) and n (sentences counted); no headline (a check, not a score).

    The draws are mixer.cmc's own (`draw`: per sentence, its concept spans and the region each replaced one
    gets), but with the evaluator's `seed` in place of the trial's and a fixed step (-1), so every
    evaluation (mid-training and final) of every trial — whatever its seed — mixes a test sentence the same
    way, as evaluator.reconstruction fixes its masks. The rate counts the draws: with `visual_tokens:
    patches` the mixer also leaves out a replacement that would overflow the text tower's max_len, which
    the rate does not subtract. It also mixes the first `num_samples` test sentences as training does
    (`sample_rows`: the vision tower embeds the regions) and writes those with a replaced span to the store's
    samples table (kind 'cmc', sample id = the test caption's: text = the mixed sentence with `[concept
    #region]` markers, reference = the original, image = the regions side by side, info = the spans with
    their source image and box, and the rate of those sentences). Runs in eval mode without gradients; no
    weight changes. Refuses a mixer without draw/sample_rows (only mixer.cmc is one today).
    """
    mixer = inputs["mixer"]
    missing = [m for m in ("draw", "sample_rows") if not callable(getattr(mixer, m, None))]
    if missing:
        raise UserError(f"node '{ctx.node}' (evaluator.mixing): its mixer ({type(mixer).__name__}) has no "
                        f"{' or '.join(m + '()' for m in missing)}; mixer.cmc has both")
    return MixingEvaluator(params, inputs["data"], mixer)
