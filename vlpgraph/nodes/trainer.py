"""Node kind ``trainer``: the optimisation settings of a trial and the set of objectives it trains."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from vlpgraph.errors import UserError
from vlpgraph.engine.ports import BuildContext, CaptionDecoder, Model, Objective, PairedData, TextTower
from vlpgraph.engine.registry import In, Params, register, size_of


class TrainerParams(Params):
    epochs: float = Field(4, gt=0, description="passes over the (train_fraction of the) training split")
    max_steps: int | None = Field(None, gt=0, description="stop after this many steps (overrides epochs when smaller)")
    batch_size: int = Field(128, ge=2, description="samples per optimiser step (per process under torchrun)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.02, ge=0, description="AdamW weight decay (not applied to biases, norms, temperatures)")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    warmup_steps: int = Field(
        100, ge=0, description="linear warmup steps before the cosine decay (a fixed count: a trial with fewer "
        "steps, e.g. at a small train_fraction, spends a larger share warming up; see warmup_fraction)"
    )
    warmup_fraction: float | None = Field(
        None, ge=0, lt=1, description="warmup as a share of the trial's steps: round(fraction x total steps), so "
        "it scales with epochs, max_steps and train_fraction (replaces warmup_steps; give one of the two). "
        "Either way, a warning is printed when warmup covers more than half of a trial"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the cosine decays to lr * min_lr_ratio")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this (null: no clipping)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    checkpoint_every: int = Field(200, ge=0, description="save a checkpoint every N steps (0: only at the end)")
    log_every: int = Field(10, ge=1, description="write training metrics to the store every N steps")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the training process)")
    eval_every: int = Field(0, ge=0, description="also run the evaluators every N steps (0: only at the end)")

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.warmup_fraction is not None and "warmup_steps" in self.model_fields_set:
            found.append(("warmup_fraction", f"give warmup_steps ({self.warmup_steps}) or warmup_fraction "
                                             f"({self.warmup_fraction}), not both"))
        if self.warmup_fraction is None and self.max_steps is not None and self.warmup_steps > self.max_steps:
            found.append(("warmup_steps", f"warmup_steps ({self.warmup_steps}) is longer than max_steps ({self.max_steps})"))
        return found


class TrainJob(Model):
    """What a trainer node builds: the trial's modules, objectives and data, ready for ``train.fit``."""

    def __init__(self, params: TrainerParams, data: PairedData, objectives: dict[str, Objective], modules: dict[str, nn.Module], device):
        self.params = params
        self.data = data
        self.objectives = objectives
        self.modules = nn.ModuleDict(modules)
        self.device = device
        tokenizers = {}
        for m in self.modules.modules():
            if isinstance(m, (TextTower, CaptionDecoder)):
                tokenizers[m.tokenizer.content_hash] = m.tokenizer
        if len(tokenizers) > 1:
            raise UserError("the objectives use text towers / caption decoders with different tokenizers (vocab_size, max_len or tokenizer file differ); one trial needs one tokenizer")
        self.tokenizer = next(iter(tokenizers.values()), None)


def check(p: TrainerParams, inputs: dict) -> list[tuple[str, str]]:
    """batch_size against the training split's size when the data knows it before building."""
    return [("batch_size", f"batch_size {p.batch_size} is larger than the training split of "
                           f"'{d['node']}' ({size_of(d, 'train_size')}): not one step per epoch")
            for d in inputs.get("data", []) if d.get("train_size") is not None and p.batch_size > d["train_size"]]


@register(
    "trainer",
    params=TrainerParams,
    output=TrainJob,
    inputs={
        "data": In(PairedData, doc="the training data"),
        "objectives": In(Objective, many=True, doc="objectives whose weighted terms are summed into the loss"),
    },
    check=check,
)
def build(params: TrainerParams, inputs: dict, ctx: BuildContext) -> TrainJob:
    """Trains the objectives' modules jointly with AdamW and a warmup+cosine schedule.

    Warmup is linear over `warmup_steps` steps, or over `warmup_fraction` of the trial's steps
    (which keeps the schedule's shape when a sweep changes the amount of data); the rate then decays
    along a cosine to `lr * min_lr_ratio` at the last step.

    Each step: one batch from ``data`` (tokenised with the text tower's tokenizer), every objective
    returns named loss terms, the trainer multiplies them by the objective's ``weight``, sums them,
    logs each term, and takes one optimiser step. Checkpoints (safetensors weights + optimiser state +
    random generator states, with each file's size and sha256) are written atomically every
    ``checkpoint_every`` steps, at the end and when the run is asked to stop (SIGTERM, Ctrl-C); the
    two newest are kept. An interrupted trial resumes exactly (the same batches and random draws as
    without the interruption) from the newest intact one; a damaged one is set aside with a warning.
    A NaN/inf loss fails the trial with the step and the terms.
    Output: the trained model, which evaluators take as their ``model`` input.
    """
    modules = {name: out for name, out in ctx.upstream.items() if isinstance(out, nn.Module)}
    return TrainJob(params, inputs["data"], inputs["objectives"], modules, ctx.device)
