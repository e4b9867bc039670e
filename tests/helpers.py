"""What the tests share besides fixtures (those are in conftest.py): paths, the tiny graph, the synthetic
store's values."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

TINY = """\
graph: tiny
seed: 0
nodes:
  shapes:
    kind: dataset.shapes
    params: {{train_size: 256, test_size: 64, image_size: 32, caption_noise: 0.2}}
  vision:
    kind: encoder.vit
    params: {{image_size: 32, patch_size: 8, width: 32, depth: 1, heads: 2}}
  text:
    kind: encoder.text
    inputs: {{data: shapes}}
    params: {{width: 32, depth: 1, heads: 2, max_len: 24}}
  itc:
    kind: objective.itc
    inputs: {{vision: vision, text: text}}
    params: {{embed_dim: 32}}
  train:
    kind: trainer
    inputs: {{data: shapes, objectives: [itc]}}
    params: {{epochs: {epochs}, batch_size: 16, lr: 1.0e-3, warmup_steps: 2, checkpoint_every: {ckpt}, log_every: 1{extra}}}
  retrieval:
    kind: evaluator.retrieval
    inputs: {{model: train, data: shapes}}
{more}"""


def tiny_graph(tmp_path: Path, name: str = "tiny.yaml", ckpt: int = 4, extra: str = "", more: str = "", epochs: int = 1) -> Path:
    path = tmp_path / name
    path.write_text(TINY.format(ckpt=ckpt, extra=extra, more=more, epochs=epochs))
    return path


# The synthetic store's sweep: 2 variants x 5 train fractions x 6 seeds, plus one failed run.
SYN_VARIANTS = ("baseline", "timix")
SYN_FRACTIONS = (0.1, 0.2, 0.4, 0.7, 1.0)
SYN_SEEDS = tuple(range(6))
SYN_STEPS = 200


def syn_rsum(variant: str, fraction: float, seed: int) -> float:
    """retrieval.rsum of a synthetic run at its final step (seeds spread it, so std > 0)."""
    return round(fraction * (1.3 if variant == "timix" else 1.0) + 0.01 * seed, 6)


def syn_wall(variant: str, fraction: float, seed: int) -> float:
    return 100 * fraction * (1.5 if variant == "timix" else 1.0) + seed
