"""What the tests share besides fixtures (those are in conftest.py): paths, a node's BuildContext, a batch,
tiny graphs written from a few params, kinds registered only for a test, the synthetic store's values.

A graph is a dict of nodes in file order, each made by :func:`node` (or a shorthand: :func:`shapes`,
:func:`vit`, :func:`text`, :func:`itc`, :func:`trainer`, :func:`evaluator`), and :func:`tiny_graph` writes it
in the layout the graphs of the tests use, one key a line::

      vision:
        kind: encoder.vit
        params: {image_size: 32, patch_size: 8, width: 32, depth: 1, heads: 2}

so a test may still edit the text or assert a line number (``graph_text``'s lines are stable).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlpgraph.engine.ports import BuildContext, TextTower, VisionTower

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
GRAPHS = ROOT / "graphs"


# ------------------------------------------------------------------------------------------ building


def build_ctx(node: str = "n", seed: int = 0, cache: Path | None = None, *, base_dir: Path | None = None,
              log: list | Callable[[str], None] | None = None, upstream: dict | None = None) -> BuildContext:
    """The BuildContext of node ``node`` for a build function called by hand: ``cache`` is its cache_root,
    ``log`` a list its notes are appended to (or a callable; None: they are dropped), ``base_dir`` the
    folder relative paths resolve against (the working directory when None)."""
    notes = log.append if isinstance(log, list) else (log or (lambda message: None))
    extra = {} if base_dir is None else {"base_dir": base_dir}
    return BuildContext(node=node, node_hash="h", seed=seed, cache_root=cache, log=notes,
                        upstream=upstream or {}, **extra)


def build(kind: str, inputs: dict | None = None, ctx: BuildContext | None = None, **params):
    """Node kind ``kind`` built from ``params`` (validated as a graph's would be) and ``inputs``."""
    from vlpgraph.engine import registry

    k = registry.get(kind)
    return k.build(k.params(**params), inputs or {}, ctx or build_ctx(kind.split(".")[-1]))


def make_batch(b: int = 4, size: int = 4, seed: int | None = 0, text_len: int = 0, vocab: int = 50,
               generator: torch.Generator | None = None, **extra) -> dict:
    """A batch of ``b`` random ``size`` x ``size`` images (drawn from a generator seeded with ``seed``, or
    from ``generator``; seed None: the global generator), with ``text_len`` random token ids in 1..vocab-1
    per caption (all attended) when it is not 0, and ``extra`` keys as given."""
    g = generator if generator is not None else (None if seed is None else torch.Generator().manual_seed(seed))
    batch = {"images": torch.randn(b, 3, size, size, generator=g)}
    if text_len:
        batch["input_ids"] = torch.randint(1, vocab, (b, text_len), generator=g)
        batch["attention_mask"] = torch.ones(b, text_len, dtype=torch.long)
    batch.update(extra)
    return batch


class FakeVision(VisionTower):
    """[B, 3, H, W] -> [B, 1 + 4, width]: a linear map of the image's 2 x 2 average pool, their mean first
    (patch_size 2, grid 2 x 2). Counts its calls."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.width = width
        self.patch_size = 2
        self.grid_size = (2, 2)
        self.proj = nn.Linear(3, width)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        patches = F.adaptive_avg_pool2d(images, 2).flatten(2).transpose(1, 2)  # [B, 4, 3]
        return self.proj(torch.cat([patches.mean(1, keepdim=True), patches], dim=1))


class FakeText(TextTower):
    """input_ids [B, L] -> [B, L, width]: token embeddings; ``pooled``: masked, position 0 the sum of the
    caption's (so it mixes in the whole caption). Counts its calls."""

    def __init__(self, width: int = 6, vocab: int = 50, pooled: bool = True):
        super().__init__()
        self.width = width
        self.emb = nn.Embedding(vocab, width)
        self.pooled = pooled
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.pooled:
            return self.emb(input_ids)
        x = self.emb(input_ids) * attention_mask[..., None]
        return torch.cat([x.sum(1, keepdim=True), x[:, 1:]], dim=1)


# ------------------------------------------------------------------------------------------ graphs

# The towers most graphs of the tests use: a one-block ViT on 32 px images and a one-block BERT.
VIT = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2}
TEXT = {"width": 32, "depth": 1, "heads": 2}


def node(kind: str, inputs: dict | None = None, **params) -> dict:
    """One node of a graph; a param given as None is left out (as a default it overrides)."""
    spec: dict[str, Any] = {"kind": kind}
    if inputs:
        spec["inputs"] = inputs
    params = {k: v for k, v in params.items() if v is not None}
    if params:
        spec["params"] = params
    return spec


def shapes(**params) -> dict:
    """dataset.shapes with 64 training and 32 test images unless ``params`` say otherwise."""
    return node("dataset.shapes", **{"train_size": 64, "test_size": 32, **params})


def vit(data: str | None = None, **params) -> dict:
    """encoder.vit with VIT's params updated by ``params``; wired to ``data``, it takes its image size from it."""
    if data is None:
        return node("encoder.vit", **{**VIT, **params})
    return node("encoder.vit", {"data": data}, **{**VIT, "image_size": None, **params})


def text(data: str = "shapes", **params) -> dict:
    """encoder.text on ``data``'s captions with TEXT's params updated by ``params``."""
    return node("encoder.text", {"data": data}, **{**TEXT, **params})


def itc(**inputs_and_params) -> dict:
    """objective.itc on the nodes 'vision' and 'text'; a node name given for 'mixer' wires that input."""
    mixer = inputs_and_params.pop("mixer", None)
    return node("objective.itc", {"vision": "vision", "text": "text", **({"mixer": mixer} if mixer else {})},
                **inputs_and_params)


def mae(**params) -> dict:
    """objective.mae on the node 'vision' with a one-block decoder of width 32."""
    decoder = {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}
    return node("objective.mae", {"vision": "vision"}, **{**decoder, **params})


def trainer(*objectives: str, data: str = "shapes", **params) -> dict:
    """The trainer of ``objectives`` on ``data``: one epoch, batches of 16 unless ``params`` say otherwise."""
    return node("trainer", {"data": data, "objectives": list(objectives)}, **{"epochs": 1, "batch_size": 16, **params})


def evaluator(kind: str, data: str = "shapes", inputs: dict | None = None, **params) -> dict:
    """evaluator.<kind> of the model the node 'train' trains, on ``data`` (and ``inputs``)."""
    return node(f"evaluator.{kind}", {"model": "train", "data": data, **(inputs or {})}, **params)


def lcl_nodes(data: str = "shapes", max_len: int = 160) -> dict[str, dict]:
    """LCL's pieces on ``data``'s documents: a ViT, head.attentive_pool over it, encoder.lm (sequences of up
    to ``max_len`` tokens) and objective.lcl."""
    return {
        "vision": vit(),
        "pool": node("head.attentive_pool", {"vision": "vision"}, heads=2),
        "lm": node("encoder.lm", {"data": data}, **TEXT, max_len=max_len),
        "lcl": node("objective.lcl", {"data": data, "vision": "vision", "pool": "pool", "lm": "lm"}, embed_dim=32),
    }


def captions_itc_nodes() -> dict[str, dict]:
    """ITC on dataset.captions reading data/train.csv (one test item, 16 px), in batches of 2."""
    return {
        "data": node("dataset.captions", annotations="data/train.csv", test_size=1, image_size=16),
        "vision": vit("data"), "text": text("data"), "itc": itc(),
        "train": trainer("itc", data="data", epochs=None, batch_size=2),
    }


# trainer params of the tiny graph: 16 steps an epoch on its 256 images, a checkpoint every 4 steps
TINY_TRAIN = {"epochs": 1, "batch_size": 16, "lr": "1.0e-3", "warmup_steps": 2, "checkpoint_every": 4, "log_every": 1}


def itc_nodes() -> dict[str, dict]:
    """The tiny graph's nodes: shapes -> ViT + BERT -> objective.itc -> trainer -> evaluator.retrieval,
    which trains in seconds on 2 CPU cores."""
    return {
        "shapes": shapes(train_size=256, test_size=64, image_size=32, caption_noise=0.2),
        "vision": vit(),
        "text": text(max_len=24),
        "itc": itc(embed_dim=32),
        "train": trainer("itc", **TINY_TRAIN),
        "retrieval": evaluator("retrieval"),
    }


def flow(value) -> str:
    """``value`` as a YAML flow scalar, list or mapping; strings are written as they are."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def graph_text(nodes: dict[str, dict], graph: str = "t", seed: int | None = 0, more: str = "") -> str:
    """The YAML of a graph of ``nodes`` ({name: node(...)}, in file order), then ``more`` (a sweep:, ...)."""
    lines = [f"graph: {graph}", *([f"seed: {seed}"] if seed is not None else []), "nodes:"]
    for name, spec in nodes.items():
        lines.append(f"  {name}:")
        lines += [f"    {key}: {flow(value) if key != 'kind' else value}" for key, value in spec.items()]
    return "\n".join(lines) + "\n" + more


def tiny_graph(folder: Path | None = None, name: str = "tiny.yaml", *, graph: str = "tiny", seed: int | None = 0,
               nodes: dict[str, dict] | None = None, more: str = "", **edits: dict | None) -> Path | str:
    """A tiny graph: ``nodes`` (by default :func:`itc_nodes`), edited by node name: a node(...) replaces
    that node (or comes last, if the name is new), None leaves it out, a dict updates its params (None
    leaves one out; the key "inputs" updates its inputs); then ``more``. Written to ``folder/name``
    (returned) when ``folder`` is given, else returned as text."""
    nodes = dict(itc_nodes() if nodes is None else nodes)
    for key, edit in edits.items():
        if edit is None:
            nodes.pop(key)
        elif "kind" in edit:
            nodes[key] = edit
        else:
            spec, edit = nodes[key], dict(edit)
            inputs = {**spec.get("inputs", {}), **edit.pop("inputs", {})}
            nodes[key] = node(spec["kind"], inputs, **{**spec.get("params", {}), **edit})
    yaml = graph_text(nodes, graph, seed, more)
    if folder is None:
        return yaml
    path = folder / name
    path.write_text(yaml)
    return path


# ------------------------------------------------------------------------------ runs

CLI = [sys.executable, "-m", "vlpgraph.cli"]


def start_run(graph: Path | str, env: dict, *args: str, text: bool = False) -> subprocess.Popen:
    """`vlpgraph run graph *args` in a process of its own (in the repository, with ``env``), its stderr
    piped for the test to read."""
    return subprocess.Popen([*CLI, "run", str(graph), *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=text)


def objectives_of(trial) -> set[str]:
    """The kinds of the objectives a trial's trainer trains."""
    nodes = trial.graph.nodes
    return {nodes[n].kind.name for n in nodes["train"].input_names("objectives")}


# ------------------------------------------------------------------------------ kinds for one test


def register_vision_objective(name: str, terms: Callable[[torch.Tensor, dict], dict]) -> None:
    """Registers objective kind ``name`` (once per process; the registry refuses duplicates): a node
    with a 'vision' input whose loss terms are ``terms(mean image token of the batch, batch)``."""
    from vlpgraph.engine import registry
    from vlpgraph.engine.ports import Objective
    from vlpgraph.engine.registry import In, Params

    if name in registry.kinds():
        return

    class WeightParams(Params):
        weight: float = 1.0

    class VisionObjective(Objective):
        def __init__(self, vision):
            super().__init__()
            self.vision_ref = (vision,)

        def forward(self, fwd, batch):
            return terms(fwd.image_tokens(self.vision_ref[0]).mean(), batch)

    registry.register(name, params=WeightParams, output=VisionObjective, inputs={"vision": In(VisionTower)})(
        lambda params, inputs, ctx: VisionObjective(inputs["vision"]))


# ------------------------------------------------------------------------------ the synthetic store

# The synthetic store's sweep (conftest.synthetic_store): 2 variants x 5 train fractions x 6 seeds, plus
# one failed run.
SYN_VARIANTS = ("baseline", "timix")
SYN_FRACTIONS = (0.1, 0.2, 0.4, 0.7, 1.0)
SYN_SEEDS = tuple(range(6))
SYN_STEPS = 200


def syn_rsum(variant: str, fraction: float, seed: int) -> float:
    """retrieval.rsum of a synthetic run at its final step (seeds spread it, so std > 0)."""
    return round(fraction * (1.3 if variant == "timix" else 1.0) + 0.01 * seed, 6)


def syn_wall(variant: str, fraction: float, seed: int) -> float:
    return 100 * fraction * (1.5 if variant == "timix" else 1.0) + seed
