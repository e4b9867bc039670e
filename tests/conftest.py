"""Fixtures every folder may use: a private store for CLI subprocesses, the app's store of real runs, and a
synthetic store with known values (what they share besides fixtures is in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import GRAPHS, SYN_FRACTIONS, SYN_SEEDS, SYN_STEPS, SYN_VARIANTS, syn_rsum, syn_wall


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch on one thread for a module whose runs are compared bit for bit: there CPU kernels are
    deterministic. With 2 threads, two *uninterrupted* runs of the TiMix tiny graph already differ by up
    to 3e-6 in a ViT's qkv bias (its key part gets a gradient that is float noise, which Adam scales up to
    lr-sized steps). A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    (12 runs of 3 variants x 4 train fractions, grounding heatmaps and TiMix mixed samples). ~25 s."""
    from vlpgraph.cli import main

    root = tmp_path_factory.mktemp("app") / "store"
    assert main(["run", str(GRAPHS / "smoke.yaml"), "--store", str(root)]) == 0
    assert main(["run", str(GRAPHS / "timix_sweep.yaml"), "--profile", "tiny", "--store", str(root)]) == 0
    return root


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """A store written through the Store API with values the tests can compute by hand: 60 completed
    runs of graph 'syn' (rsum = syn_rsum at step 200, half that at step 100) and one failed run whose
    absurd rsum (100) must never reach an aggregate."""
    from vlpgraph.store import Store

    root = tmp_path_factory.mktemp("syn") / "store"
    store = Store(root)

    def write(run_id, variant, fraction, seed, status, rsum, wall):
        doc = {"graph": "syn", "variant": variant, "seed": seed, "grid": {"shapes.train_fraction": fraction},
               "nodes": {"shapes": {"kind": "dataset.shapes", "inputs": {}, "params": {"train_fraction": fraction}},
                         "vision": {"kind": "encoder.vit", "inputs": {}, "params": {"width": 64}},
                         "train": {"kind": "trainer", "inputs": {"data": "shapes"}, "params": {"lr": 0.001}}}}
        store.start_run(run_id, graph="syn", variant=variant, seed=seed, params=doc, device="cpu",
                        flat_params={"shapes.train_fraction": fraction, "vision.width": 64, "train.lr": 0.001})
        store.log_metrics(run_id, [dict(step=s, name="loss", value=10 - 0.01 * s + 0.001 * seed, wall_s=0.1 * s)
                                   for s in range(SYN_STEPS)] +
                          [dict(step=s, name="lr", value=1e-3) for s in range(0, SYN_STEPS, 10)])
        store.log_evals(run_id, [dict(step=SYN_STEPS // 2, evaluator="retrieval", metric="rsum", value=rsum / 2, headline=True),
                                 dict(step=SYN_STEPS, evaluator="retrieval", metric="rsum", value=rsum, headline=True),
                                 dict(step=SYN_STEPS, evaluator="retrieval", metric="n", value=64)])
        store.finish_run(run_id, status, wall_s=wall, step=SYN_STEPS, error="boom" if status == "failed" else None)

    for variant in SYN_VARIANTS:
        for fraction in SYN_FRACTIONS:
            for seed in SYN_SEEDS:
                write(f"{variant}-{fraction}-s{seed}", variant, fraction, seed, "completed",
                      syn_rsum(variant, fraction, seed), syn_wall(variant, fraction, seed))
    write("baseline-1.0-s99", "baseline", 1.0, 99, "failed", 100.0, 1.0)
    return root
