"""Shared fixtures: tiny graphs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running the CLI in a subprocess with a private store."""
    env = dict(os.environ)
    env["VLPGRAPH_STORE"] = str(tmp_path / "store")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="session")
def app_store(tmp_path_factory) -> Path:
    """A store the app's tests read: the smoke graph plus graphs/timix_sweep.yaml on its tiny profile
    (15 runs of 3 variants x 5 train fractions, grounding heatmaps and TiMix mixed samples). ~25 s."""
    from vlpgraph.cli import main

    root = tmp_path_factory.mktemp("app") / "store"
    assert main(["run", str(ROOT / "graphs" / "smoke.yaml"), "--store", str(root)]) == 0
    assert main(["run", str(ROOT / "graphs" / "timix_sweep.yaml"), "--profile", "tiny", "--store", str(root)]) == 0
    return root
