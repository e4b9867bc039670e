"""The one-command GPU check: throughput, model FLOP utilisation, memory, engine overhead, TiMix cost
and the GPU-only tests, in one run and one table.

    python benchmarks/gpu.py                  # everything: est. 3-4 minutes on one H100/H200, written to stay under 8
    python benchmarks/gpu.py --quick          # fewer steps everywhere (about half the time)
    python benchmarks/gpu.py --parts b,e      # only some parts
    python benchmarks/gpu.py --peak-tflops 989  # the device's dense bf16 peak, when the table does not know it

Without CUDA it says so and exits 0 (nothing to measure). With CUDA, every part below runs on
``cuda`` in this process (part e in a subprocess); a part that fails (xformers not installed, out of
memory, ...) puts its error in its row and the next part runs. Exit status 1 when any part failed.

Parts (one or more rows of the table each):

a. ``graphs/clip_baseline.yaml`` at its ``gpu`` profile (ViT 384 wide, 12 deep, 64 px images, patch 8;
   text 384 x 6; batch 512; bf16 autocast), trained through ``vlpgraph.execution.train.fit`` for ``--steps-a``
   steps from the real data loader (nothing saved). The data set is shrunk to what those steps read
   (``shapes.train_size`` = batch x steps; the model and the step are the profile's).
b. A ViT-B/16-sized CLIP step, as OpenCLIP's ViT-B-16: vision 224 px, patch 16, width 768, depth 12,
   12 heads; text width 512, depth 12, 8 heads, 77 tokens (vlpgraph's BERT text tower, a trained
   WordPiece, so its vocabulary is smaller than CLIP's 49408 BPE: the embedding table is, the matmul
   FLOPs are not); ITC with a 512-d embedding; bf16 autocast; AdamW and gradient clipping as the
   trainer does. The same model and one fixed batch (random images, random token ids, no padding)
   with each attention backend in turn: xformers, sdpa, math (``set_attention_backend``); ``--steps-b``
   steps after ``--warmup-b``, each timed by CUDA events recorded between steps (no host
   synchronisation inside the run); the printed analytic FLOPs of the towers cross-check the count.
c. Engine step vs a hand-written loop on part a's model: the protocol of
   ``benchmarks/step_overhead.py`` (same modules, batches, AdamW, schedule and clip; the hand loss
   checked equal to the engine's objective on one batch; ``--rounds-c`` rounds of engine then hand,
   ``--steps-c`` steps each) with CUDA-synchronised timers: ``torch.cuda.synchronize()`` at the end of
   every step, and a step is the time from the end of one step to the end of the next (data loading
   included), steps 2..K of each call. The ratio is engine / hand of the per-round medians, median
   over rounds.
d. TiMix's cost at GPU size: ``graphs/timix_sweep.yaml`` at its ``gpu`` profile (train_fraction 1.0,
   seed 0), variants baseline (ITC + ITM + MLM), cutmix and timix (+ TPP, PTA, TiMix), every mixer set
   to mix on every step (``ramp_epochs: 0``, ``stop_fraction: 1.0``), as ``benchmarks/mixers.py`` does
   on CPU: ``--rounds-d`` rounds, each variant ``--steps-d`` steps per round, timed as in part c;
   ratio variant / baseline of the per-round medians, median over rounds.
e. ``pytest -m gpu`` (the tests that skip without CUDA), as a subprocess.

Columns: ms/step (median), samples/s (batch / that median), TFLOP/step (matmul FLOPs of one whole
training step, forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
step with every attention switched to the ``math`` backend so that attention's matmuls are visible
to the counter whatever backend is timed; softmax, norms and the optimiser are not counted, as usual
for MFU), TFLOP/s, MFU (TFLOP/s over the device's dense bf16 peak: ``PEAK_BF16`` by device name, or
``--peak-tflops``), peak memory (``torch.cuda.max_memory_allocated`` over the timed steps: weights,
gradients, AdamW state and activations), vs (the part's ratio, see above) and a note.

tests/benchmarks/test_gpu.py runs parts a-d on CPU at toy sizes (``DEVICE`` and ``Bench``'s ``sets`` and
``vit_b16``), so this file keeps working between the occasions a GPU is at hand.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

# vlpgraph (and through it timm and transformers) is imported inside the parts, not here: the
# "needs CUDA" exit and the pure helpers (imported by tests/benchmarks/test_gpu.py) stay fast.

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # measure this checkout's vlpgraph, installed or not (python benchmarks/gpu.py)
    sys.path.insert(0, str(ROOT))
DEVICE = torch.device("cuda")  # every part measures this device (tests run the parts on "cpu" at toy sizes)

# Dense bf16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets (which print twice these, "with
# sparsity"). A key matches when its words appear, in order and whole, among the words of
# torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA GH200 480GB");
# the first match wins, so a longer key stands before the key it extends.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756e12),
    ("H800", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def _words(name: str) -> list[str]:
    return re.findall(r"[A-Z0-9]+", name.upper())


def peak_bf16_flops(device_name: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak in FLOP/s, where it came from) for a device name; ``override_tflops`` (TFLOP/s)
    wins; (None, why) when the name is not in ``PEAK_BF16``."""
    if override_tflops is not None:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    words = _words(device_name)
    for key, peak in PEAK_BF16:
        k = _words(key)
        if any(words[i:i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            return peak, f"table entry '{key}' ({peak / 1e12:g} TFLOP/s dense bf16)"
    return None, f"'{device_name}' is not in the peak table: pass --peak-tflops for MFU"


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the device's peak."""
    return flops_per_step / seconds_per_step / peak_flops


def transformer_forward_flops(batch: int, seq: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of a transformer encoder's forward (a multiply-add is 2 FLOPs): per layer and token
    2 * (4 d^2 + 2 r d^2) for q, k, v, the output projection and the MLP, plus 2 * 2 * L * d for the
    attention scores and their weighted sum."""
    d = width
    per_layer = 2 * batch * seq * (4 * d * d + 2 * mlp_ratio * d * d) + 4 * batch * seq * seq * d
    return depth * per_layer


def vit_forward_flops(batch: int, image_size: int, patch: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """A ViT's forward matmul FLOPs: the patch embedding plus the blocks over patches + [CLS]."""
    patches = (image_size // patch) ** 2
    embed = 2 * batch * patches * (3 * patch * patch) * width
    return embed + transformer_forward_flops(batch, patches + 1, width, depth, mlp_ratio)


@contextmanager
def math_attention(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule that routes through ``attend()`` on the ``math`` backend for the block (so
    FlopCounterMode sees attention as matmuls), its own backend restored afterwards."""
    saved = [(m, m.attention_backend) for m in module.modules() if hasattr(m, "attention_backend")]
    for m, _ in saved:
        m.attention_backend = "math"
    try:
        yield
    finally:
        for m, backend in saved:
            m.attention_backend = backend


def count_flops(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """Matmul FLOPs that ``fn()`` runs (forward and backward, if it calls backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` with ``module``'s attention on the math backend."""
    from torch.utils.flop_counter import FlopCounterMode

    with math_attention(module), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------ table


@dataclass
class Row:
    part: str
    case: str
    batch: int | None = None
    step_s: float | None = None  # median seconds per training step
    flops: float | None = None  # FLOPs of one training step
    peak_bytes: int | None = None
    vs: str = ""  # the part's ratio column
    note: str = ""
    error: str | None = None


COLUMNS = ("part", "case", "batch", "ms/step", "samples/s", "TFLOP/step", "TFLOP/s", "MFU", "peak GiB", "vs", "note")


def row_cells(row: Row, peak_flops: float | None) -> list[str]:
    """The table cells of one row; '-' where a value is unknown; an error replaces the note."""
    dash = "-"
    has_time = row.step_s is not None and row.step_s > 0
    cells = [
        row.part,
        row.case,
        str(row.batch) if row.batch else dash,
        f"{row.step_s * 1e3:.1f}" if has_time else dash,
        f"{row.batch / row.step_s:.0f}" if has_time and row.batch else dash,
        f"{row.flops / 1e12:.3f}" if row.flops else dash,
        f"{row.flops / row.step_s / 1e12:.1f}" if has_time and row.flops else dash,
        f"{100 * mfu(row.flops, row.step_s, peak_flops):.1f}%" if has_time and row.flops and peak_flops else dash,
        f"{row.peak_bytes / 2**30:.2f}" if row.peak_bytes is not None else dash,
        row.vs or dash,
        f"ERROR {row.error}" if row.error else row.note,
    ]
    return [c.replace("|", "/").replace("\n", " ") for c in cells]


def format_table(rows: list[Row], peak_flops: float | None) -> list[str]:
    """The rows as a Markdown table (aligned, so it also reads in a terminal)."""
    body = [row_cells(r, peak_flops) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(COLUMNS)]
    numeric = set(range(2, 10))

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i in numeric else "-") for i, w in enumerate(widths)) + "|"
    return [line(list(COLUMNS)), rule, *(line(b) for b in body)]


def error_text(e: BaseException) -> str:
    """One line for a table cell: the exception's type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def run_part(part: str, what: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """``fn()``'s rows, or one row carrying its error (the traceback goes to stderr): one failing
    part never stops the others."""
    t0 = time.perf_counter()
    print(f"\n== part {part}: {what}", flush=True)
    try:
        rows = fn()
    except Exception as e:  # noqa: BLE001 - any failure of a part is reported in its row
        traceback.print_exc(file=sys.stderr)
        rows = [Row(part, what, error=error_text(e))]
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    print(f"   part {part} took {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


# ---------------------------------------------------------------------------------- measurement


def median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def sync() -> None:
    """Wait until the device has done everything queued so far (CUDA runs asynchronously to Python)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    sync()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int | None:
    """Bytes allocated at most since ``reset_peak_memory`` (None off CUDA: not measured)."""
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else None


def step_times(step: Callable[[], None], n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``step``. On CUDA from events recorded between the calls on
    the current stream, with no host synchronisation between steps (as in a real training loop); the
    intervals tile the whole run. Elsewhere from the host clock."""
    if DEVICE.type != "cuda":
        marks = [time.perf_counter()]
        for _ in range(n):
            step()
            marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])]
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    for i in range(n):
        step()
        events[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]  # elapsed_time is in ms


class EngineSteps:
    """Times ``vlpgraph.execution.train.fit`` on one compiled job: K steps per call, nothing saved, every step
    logged; a step lasts from one ``on_step`` call to the next with the device synchronised at each
    (fit's own ``compute_s`` metric does not wait for the GPU)."""

    def __init__(self, job, seed: int):
        self.job, self.seed = job, seed
        self.base = job.params
        self.last = None  # the FitResult of the last timing call

    def run(self, steps: int) -> list[float]:
        """Seconds of steps 2..steps of one fit call (the first step allocates AdamW's state)."""
        from vlpgraph.execution.train import Hooks, fit

        marks: list[float] = []

        def on_step(step: int, total: int, loss: float, sps: float) -> None:
            sync()
            marks.append(time.perf_counter())

        with self._steps(steps):
            res = fit(self.job, self.seed, None, Hooks(on_step=on_step))
        assert res.step == steps and len(marks) == steps, (res.step, len(marks))
        self.last = res
        return [b - a for a, b in zip(marks, marks[1:])]

    def flops(self) -> int:
        """Matmul FLOPs of one engine step (one fit call of one step under FlopCounterMode)."""
        from vlpgraph.execution.train import fit

        with self._steps(1):
            return count_flops(lambda: fit(self.job, self.seed, None), self.job.modules)

    @contextmanager
    def _steps(self, steps: int) -> Iterator[None]:
        """The job's trainer params for a timing call: ``steps`` steps, every one logged, nothing saved,
        no mid-run evaluation; the graph's own params restored afterwards."""
        self.job.params = self.base.model_copy(update=dict(max_steps=steps, log_every=1, checkpoint_every=0, eval_every=0))
        try:
            yield
        finally:
            self.job.params = self.base


def itc_hand_loss(itc, batch: dict) -> torch.Tensor:
    """benchmarks/step_overhead.py's hand loss (objective.itc's loss without the engine)."""
    from benchmarks.step_overhead import itc_hand_loss as hand_loss  # ROOT is on sys.path (above)

    return hand_loss(itc, batch)


class HandLoop:
    """The hand-written loop of benchmarks/step_overhead.py on a job with one objective.itc: the same
    modules, AdamW settings, warmup+cosine schedule, gradient clip and batches (same sampler, collate
    and loader settings as fit, pinned memory included)."""

    def __init__(self, job, seed: int, full_steps: int):
        from vlpgraph.nodes.objectives import itc as itc_mod
        from vlpgraph.execution.train import Collate, cosine_with_warmup, param_groups, plan_warmup

        objectives = list(job.objectives.values())
        if len(objectives) != 1 or not isinstance(objectives[0], itc_mod.ITC):
            raise RuntimeError(f"the hand loop implements exactly one objective.itc; this job has {list(job.objectives)}")
        self.job, self.seed, self.itc = job, seed, objectives[0]
        p = job.params
        self.modules = job.modules.to(job.device).train()
        self.optimizer = torch.optim.AdamW(param_groups(self.modules, p.weight_decay), lr=p.lr, betas=tuple(p.betas))
        warmup = plan_warmup(p.warmup_steps, p.warmup_fraction, full_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(warmup, full_steps, p.min_lr_ratio))
        self.params = [q for g in self.optimizer.param_groups for q in g["params"]]
        self.collate = Collate(job.data.collate, job.tokenizer)

    def loss_check(self) -> tuple[float, float]:
        """(engine objective's loss, hand loss) on the first training batch, no gradient."""
        from vlpgraph.engine.ports import Forward
        from vlpgraph.execution.train import autocast_for, to_device

        p, device = self.job.params, self.job.device
        batch = to_device(self.collate([self.job.data.train[i] for i in range(p.batch_size)]), device)
        with torch.no_grad(), autocast_for(p.precision, device):
            engine = float(sum(self.itc.weight * v for v in self.itc(Forward(batch), batch).values()))
            hand = float(self.itc.weight * itc_hand_loss(self.itc, batch))
        return engine, hand

    def run(self, steps: int) -> list[float]:
        """Seconds of steps 2..steps, each from the end of the step before (synchronised) to its own end."""
        from torch.utils.data import DataLoader

        from vlpgraph.execution.train import EpochBatches, autocast_for, to_device

        p, device = self.job.params, self.job.device
        loader = DataLoader(self.job.data.train, batch_sampler=EpochBatches(len(self.job.data.train), p.batch_size, self.seed, 0, steps),
                            collate_fn=self.collate, num_workers=p.num_workers, pin_memory=DEVICE.type == "cuda")
        marks: list[float] = []
        for batch in loader:
            batch = to_device(batch, device)
            with autocast_for(p.precision, device):
                loss = itc_hand_loss(self.itc, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, p.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            sync()
            marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])]


# ---------------------------------------------------------------------------------------- parts


class Bench:
    """The parts, sharing one temporary cache and part a's compiled model with part c.

    ``sets`` (graph name -> extra ``--set`` pairs, applied after the part's own) and ``vit_b16`` (part b's
    sizes) let tests run every part on CPU at toy sizes; the command line leaves them alone."""

    def __init__(self, args: argparse.Namespace, tmp: Path, sets: dict[str, list[tuple[str, object]]] | None = None,
                 vit_b16: dict | None = None):
        self.args, self.tmp = args, tmp
        self.sets = sets or {}
        self.vit_b16 = vit_b16 or VIT_B16
        self._clip = None

    def experiment(self, graph: Path, sets: list[tuple[str, object]] = ()):
        """``graph`` at its gpu profile with ``sets`` and this bench's extra sets for it."""
        from vlpgraph.engine.sweep import load_experiment

        return load_experiment(graph, sets=[*sets, *self.sets.get(graph.stem, [])], profile="gpu")

    def clip_plan(self):
        """clip_baseline's gpu profile, data shrunk to what parts a and c read (compiled once)."""
        if self._clip is None:
            a = self.args
            graph = ROOT / "graphs" / "clip_baseline.yaml"
            batch = self.experiment(graph).trials[0].graph.nodes["train"].params.batch_size
            steps = max(a.steps_a, a.steps_c)
            sets = [("shapes.train_size", batch * steps), ("shapes.test_size", 64)]
            t0 = time.perf_counter()
            trial, plan = self.compile_first(graph, sets)
            print(f"   clip_baseline --profile gpu compiled in {time.perf_counter() - t0:.0f} s "
                  f"(shapes.train_size {batch * steps} = batch {batch} x {steps} steps)", flush=True)
            self._clip = (trial, plan)
        return self._clip

    def compile_first(self, graph: Path, sets: list[tuple[str, object]], variant: str | None = None):
        """(trial, plan) of the first trial of ``graph`` at its gpu profile (of ``variant`` if given)."""
        from vlpgraph.engine.compile import compile_trial

        exp = self.experiment(graph, sets)
        trials = [t for t in exp.trials if variant is None or t.variant == variant]
        if not trials:
            raise RuntimeError(f"{graph}: no trial of variant {variant!r} (variants: {', '.join(exp.variants)})")
        return trials[0], compile_trial(trials[0], self.tmp / "cache", DEVICE, log=lambda message: None)

    # a ------------------------------------------------------------------------------------------
    def part_a(self) -> list[Row]:
        from vlpgraph.layers.attention import resolve_backend

        trial, plan = self.clip_plan()
        job = plan.model
        engine = EngineSteps(job, trial.seed)
        flops = engine.flops()
        engine.run(min(5, self.args.steps_a))  # warm-up call: kernel selection, allocator, loader
        reset_peak_memory()
        times = engine.run(self.args.steps_a)
        peak = peak_memory()
        warm = min(len(times) // 4, 5)
        timed = times[warm:]
        backends = sorted({m.attention_backend for m in job.modules.modules() if hasattr(m, "attention_backend")})
        auto = resolve_backend("auto", DEVICE, torch.bfloat16)
        return [Row("a", "clip_baseline gpu profile (engine fit)", job.params.batch_size, median_or_none(timed), flops, peak,
                    note=f"steps {warm + 2}..{self.args.steps_a} of one fit call, data loading included "
                         f"(num_workers {job.params.num_workers}); attention {'/'.join(backends)} (auto = {auto} here)")]

    # b ------------------------------------------------------------------------------------------
    def part_b(self) -> list[Row]:
        from vlpgraph.engine.compile import compile_trial
        from vlpgraph.layers.attention import resolve_backend, set_attention_backend
        from vlpgraph.engine.sweep import load_experiment
        from vlpgraph.execution.train import autocast_for, param_groups

        a = self.args
        size = self.vit_b16
        B, S, text_len = a.batch_b, size["image_size"], size["text_len"]
        graph = self.tmp / "vit_b16_clip.yaml"
        graph.write_text(VIT_B16_GRAPH.format(**size))
        trial = load_experiment(graph).trials[0]
        plan = compile_trial(trial, self.tmp / "cache", DEVICE, log=lambda message: None)
        job = plan.model
        itc = job.objectives["itc"]
        device = DEVICE
        modules = job.modules.to(device).train()
        n_params = sum(q.numel() for q in {id(q): q for q in modules.parameters()}.values())
        vocab = itc.text.bert.config.vocab_size
        g = torch.Generator(device=device).manual_seed(0)
        batch = {
            "images": torch.randn(B, 3, S, S, device=device, generator=g),
            "input_ids": torch.randint(0, vocab, (B, text_len), device=device, generator=g),
            "attention_mask": torch.ones(B, text_len, dtype=torch.long, device=device),
        }
        p = job.params
        optimizer = torch.optim.AdamW(param_groups(modules, p.weight_decay), lr=p.lr, betas=tuple(p.betas))
        params = [q for grp in optimizer.param_groups for q in grp["params"]]

        def step() -> None:
            with autocast_for("bf16", device):
                loss = itc_hand_loss(itc, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
            optimizer.step()

        def fwd_bwd() -> None:
            with autocast_for("bf16", device):
                loss = itc_hand_loss(itc, batch)
            loss.backward()
            optimizer.zero_grad(set_to_none=True)

        flops = count_flops(fwd_bwd, modules)
        # cross-check: backward is twice the forward, except that the images need no gradient (the patch
        # embedding's backward is its weight gradient alone); the projections and logits are left out
        patch_embed = vit_forward_flops(B, S, size["patch_size"], size["width"], 0)
        analytic = (3 * vit_forward_flops(B, S, size["patch_size"], size["width"], size["depth"]) - patch_embed
                    + 3 * transformer_forward_flops(B, text_len, size["text_width"], size["text_depth"]))
        print(f"   model {n_params / 1e6:.1f} M parameters; FLOPs per step: counted {flops / 1e12:.4g} T, "
              f"analytic (towers only) {analytic / 1e12:.4g} T", flush=True)
        rows: dict[str, Row] = {}
        for backend in ("xformers", "sdpa", "math"):
            case = f"ViT-B/16 CLIP step, {backend}"
            try:
                resolve_backend(backend, device, torch.bfloat16)  # a clear error when xformers is missing
                set_attention_backend(modules, backend)
                reset_peak_memory()
                for _ in range(a.warmup_b):
                    step()
                times = step_times(step, a.steps_b)
                peak = peak_memory()
                rows[backend] = Row("b", case, B, statistics.median(times), flops, peak,
                                    note=f"{n_params / 1e6:.0f} M params, bf16, median of {a.steps_b} steps after {a.warmup_b}")
            except Exception as e:  # noqa: BLE001 - one backend failing (not installed, OOM) leaves the others
                traceback.print_exc(file=sys.stderr)
                rows[backend] = Row("b", case, B, error=error_text(e))
                optimizer.zero_grad(set_to_none=True)
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
            done = rows[backend]
            print(f"   {backend}: " + (f"{done.step_s * 1e3:.1f} ms/step" if done.step_s else done.error), flush=True)
        ref = rows["sdpa"].step_s
        for r in rows.values():
            if r.step_s and ref:
                r.vs = f"{r.step_s / ref:.2f}x sdpa"
        return list(rows.values())

    # c ------------------------------------------------------------------------------------------
    def part_c(self) -> list[Row]:
        from vlpgraph.execution.train import plan_steps

        a = self.args
        trial, plan = self.clip_plan()
        job = plan.model
        engine = EngineSteps(job, trial.seed)
        base = engine.base
        _, full_total = plan_steps(len(job.data.train), base.batch_size, 1, base.epochs, base.max_steps)
        hand = HandLoop(job, trial.seed, full_total)
        ref, mine = hand.loss_check()
        check = f"loss check: engine {ref:.5f}, hand {mine:.5f}"
        if not abs(ref - mine) <= 1e-2 * max(1.0, abs(ref)):  # bf16 autocast: the same ops, so close
            raise RuntimeError(f"the hand loop does not compute the engine's loss ({check})")
        flops = engine.flops()
        eng, hnd, ratios = [], [], []
        for r in range(1 + a.rounds_c):  # round 0 warms up
            e, h = engine.run(a.steps_c), hand.run(a.steps_c)
            if r:
                eng += e
                hnd += h
                ratios.append(statistics.median(e) / statistics.median(h))
                print(f"   round {r}/{a.rounds_c}: engine {statistics.median(e) * 1e3:.1f} ms/step, hand "
                      f"{statistics.median(h) * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}", flush=True)
        B = base.batch_size
        how = f"{a.rounds_c} rounds x {a.steps_c} steps, steps 2..K"
        return [
            Row("c", "engine step (clip gpu profile)", B, statistics.median(eng), flops,
                vs=f"{statistics.median(ratios):.3f} engine/hand", note=f"{how}; goal <= 1.05"),
            Row("c", "hand-written loop (same model)", B, statistics.median(hnd), flops, note=check),
        ]

    # d ------------------------------------------------------------------------------------------
    def part_d(self) -> list[Row]:
        a = self.args
        graph = ROOT / "graphs" / "timix_sweep.yaml"
        batch = self.experiment(graph).trials[0].graph.nodes["train"].params.batch_size
        sets = [("shapes.train_fraction", 1.0), ("shapes.train_size", batch * a.steps_d), ("shapes.test_size", 64),
                ("mix.ramp_epochs", 0.0), ("mix.stop_fraction", 1.0)]
        engines: dict[str, EngineSteps] = {}
        for variant in VARIANTS_D:
            trial, plan = self.compile_first(graph, sets, variant)
            engines[variant] = EngineSteps(plan.model, trial.seed)
        flops = {v: e.flops() for v, e in engines.items()}
        times: dict[str, list[float]] = {v: [] for v in engines}
        per_round: dict[str, list[float]] = {v: [] for v in engines}
        peaks: dict[str, list[int]] = {v: [] for v in engines}
        for r in range(1 + a.rounds_d):  # round 0 warms up
            for v, e in engines.items():
                reset_peak_memory()
                ts = e.run(a.steps_d)
                if (peak := peak_memory()) is not None:
                    peaks[v].append(peak)
                if v != "baseline" and "mix_itc" not in e.last.last_losses:
                    raise RuntimeError(f"variant {v}: no 'mix_itc' term at the last step: it did not mix")
                if r:
                    times[v] += ts
                    per_round[v].append(statistics.median(ts))
            if r:
                print("   round " + f"{r}/{a.rounds_d}: " + ", ".join(f"{v} {per_round[v][-1] * 1e3:.1f}" for v in engines)
                      + " ms/step", flush=True)
        rows = []
        for v in engines:
            ratio = statistics.median(x / b for x, b in zip(per_round[v], per_round["baseline"]))
            rows.append(Row("d", f"timix_sweep gpu profile, {v}", batch, statistics.median(times[v]), flops[v], max(peaks[v], default=None),
                            vs=f"{ratio:.3f} vs baseline", note=f"{a.rounds_d} rounds x {a.steps_d} steps, every step mixes"))
        return rows

    # e ------------------------------------------------------------------------------------------
    def part_e(self) -> list[Row]:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=self.args.test_timeout)
        wall = time.perf_counter() - t0
        out = (res.stdout + res.stderr).strip().splitlines()
        summary = next((ln.strip("= ") for ln in reversed(out) if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)),
                       out[-1] if out else "")
        row = Row("e", "pytest -m gpu", note=f"{summary} ({wall:.0f} s)")
        if res.returncode != 0:
            print("\n".join(out[-40:]))
            row.error = f"exit {res.returncode}: {summary}"
        return [row]


VARIANTS_D = ("baseline", "cutmix", "timix")

# Part b's model, as OpenCLIP's ViT-B-16 config (text heads: 512 / 64); the graph, the synthetic batch
# and the analytic FLOP check all read these.
VIT_B16 = dict(image_size=224, patch_size=16, width=768, depth=12, heads=12,
               text_width=512, text_depth=12, text_heads=8, text_len=77, embed_dim=512)

VIT_B16_GRAPH = """\
graph: vit_b16_clip
seed: 0
nodes:
  shapes:
    kind: dataset.shapes
    params: {{train_size: 64, test_size: 8, image_size: {image_size}}}
  vision:
    kind: encoder.vit
    params: {{image_size: {image_size}, patch_size: {patch_size}, width: {width}, depth: {depth}, heads: {heads}}}
  text:
    kind: encoder.text
    inputs: {{data: shapes}}
    params: {{width: {text_width}, depth: {text_depth}, heads: {text_heads}, max_len: {text_len}}}
  itc:
    kind: objective.itc
    inputs: {{vision: vision, text: text}}
    params: {{embed_dim: {embed_dim}}}
  train:
    kind: trainer
    inputs: {{data: shapes, objectives: [itc]}}
    params: {{batch_size: 32, lr: 5.0e-4, warmup_steps: 0, precision: bf16}}
"""


# ------------------------------------------------------------------------------------------ main


PARTS = {
    "a": "clip_baseline gpu profile through the engine",
    "b": "ViT-B/16 CLIP step: xformers vs sdpa vs math (bf16)",
    "c": "engine step vs hand-written loop (clip gpu profile)",
    "d": "TiMix / baseline step ratio (timix_sweep gpu profile)",
    "e": "GPU-only tests (pytest -m gpu)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps in every part (about half the time)")
    ap.add_argument("--parts", default="abcde", help="which parts to run, e.g. 'b,e' or 'ac' (default abcde)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak in TFLOP/s (default: by device name)")
    ap.add_argument("--steps-a", type=int, default=None, help="a: steps of the timed fit call (default 60; --quick 25)")
    ap.add_argument("--batch-b", type=int, default=256, help="b: batch size of the ViT-B/16 step (default 256)")
    ap.add_argument("--steps-b", type=int, default=None, help="b: timed steps per backend (default 20; --quick 8)")
    ap.add_argument("--warmup-b", type=int, default=None, help="b: untimed steps per backend first (default 5; --quick 3)")
    ap.add_argument("--steps-c", type=int, default=None, help="c: steps per side per round (default 10; --quick 6)")
    ap.add_argument("--rounds-c", type=int, default=None, help="c: timed rounds (default 5; --quick 3)")
    ap.add_argument("--steps-d", type=int, default=None, help="d: steps per variant per round (default 8; --quick 5)")
    ap.add_argument("--rounds-d", type=int, default=None, help="d: timed rounds (default 3; --quick 2)")
    ap.add_argument("--test-timeout", type=int, default=240, help="e: seconds before pytest is stopped (default 240)")
    args = ap.parse_args(argv)
    defaults = dict(steps_a=(60, 25), steps_b=(20, 8), warmup_b=(5, 3), steps_c=(10, 6), rounds_c=(5, 3), steps_d=(8, 5), rounds_d=(3, 2))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("steps_a", "steps_c", "steps_d"):
        if getattr(args, name) < 3:
            ap.error(f"--{name.replace('_', '-')} must be at least 3 (the first step of a call is not timed)")
    if args.steps_b < 1 or args.rounds_c < 1 or args.rounds_d < 1:
        ap.error("--steps-b, --rounds-c and --rounds-d must be at least 1")
    args.parts = [p for p in args.parts.lower() if p in PARTS]
    if not args.parts:
        ap.error(f"--parts names none of {', '.join(PARTS)}")
    return args


def versions() -> str:
    import warnings

    try:
        with warnings.catch_warnings():  # a build for another torch warns on import; its row says what fails
            warnings.simplefilter("ignore")
            import xformers

        xf = f"xformers {xformers.__version__}"
    except Exception:  # noqa: BLE001 - not installed, or a broken build
        xf = "xformers not importable"
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {xf}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"benchmarks/gpu.py needs CUDA: torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); nothing to measure.")
        return 0
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    peak, peak_source = peak_bf16_flops(name, args.peak_tflops)
    print(f"# {name}: {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
          f"{props.multi_processor_count} SMs; {versions()}")
    print(f"# MFU against {peak_source}; parts {', '.join(args.parts)}{' (--quick)' if args.quick else ''}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vlpgraph-gpu-") as tmp:
        bench = Bench(args, Path(tmp))
        for part in args.parts:
            rows += run_part(part, PARTS[part], getattr(bench, f"part_{part}"))
    print()
    print(f"# benchmarks/gpu.py on {name}, {versions()}; MFU against {peak_source}")
    for line in format_table(rows, peak):
        print(line)
    failed = [r for r in rows if r.error]
    print(f"\n{len(rows)} rows, {len(failed)} with an error; {time.perf_counter() - t_start:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
