"""benchmarks/gpu.py on a machine without CUDA, and its pure helpers (peak table, MFU and FLOP
arithmetic, the FLOP counter with attention switched to math, the table, a failing part's row)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.integration
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))  # no CUDA even on a GPU machine
    res = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "benchmarks/gpu.py needs CUDA" in res.stdout
    assert "nothing to measure" in res.stdout
    assert "|" not in res.stdout  # no table: nothing was measured


@pytest.mark.integration
def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(SCRIPT), "--parts", "xyz"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--parts names none of" in res.stderr


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "H100"),  # SXM
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA GH200 480GB", "GH200"),  # not H200's entry by substring
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"),
])
def test_peak_table_lookup_by_device_name(gpu, name, key):
    table = dict(gpu.PEAK_BF16)
    peak, source = gpu.peak_bf16_flops(name)
    assert peak == table[key]
    assert f"'{key}'" in source


def test_peak_lookup_unknown_device_and_override(gpu):
    peak, source = gpu.peak_bf16_flops("NVIDIA GeForce GTX 1080")
    assert peak is None and "--peak-tflops" in source
    assert gpu.peak_bf16_flops("NVIDIA A10G")[0] is None  # not the A10's entry: a different chip
    peak, source = gpu.peak_bf16_flops("NVIDIA H100 80GB HBM3", override_tflops=500)
    assert peak == 500e12 and "--peak-tflops" in source


def test_the_brief_peaks(gpu):
    table = dict(gpu.PEAK_BF16)
    assert table["H100"] == table["H200"] == 989e12
    assert table["A100"] == 312e12


def test_mfu_arithmetic(gpu):
    flops, seconds, peak = 3.0e12, 0.02, 989e12
    assert gpu.mfu(flops, seconds, peak) == pytest.approx(flops / seconds / peak)
    # twice the work in the same time is twice the utilisation; twice the time, half
    assert gpu.mfu(2 * flops, seconds, peak) == pytest.approx(2 * gpu.mfu(flops, seconds, peak))
    assert gpu.mfu(flops, 2 * seconds, peak) == pytest.approx(gpu.mfu(flops, seconds, peak) / 2)


def _tiny_vit():
    from vlpgraph.nodes.encoders.vit import ViTParams, build_vit

    torch.manual_seed(0)
    p = ViTParams(image_size=32, patch_size=8, width=48, depth=2, heads=2, attention="sdpa")
    return build_vit(p, 32), p


def test_analytic_vit_flops_equal_the_counted_ones(gpu):
    """The analytic formula (part b's cross-check) counts exactly the matmuls FlopCounterMode sees in
    vlpgraph's ViT tower; count_flops switches attention to math for it and puts sdpa back."""
    vit, p = _tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    counted = gpu.count_flops(lambda: vit(images), vit)
    assert counted == gpu.vit_forward_flops(3, 32, p.patch_size, p.width, p.depth, p.mlp_ratio)
    backends = {m.attention_backend for m in vit.modules() if hasattr(m, "attention_backend")}
    assert backends == {"sdpa"}  # restored


def test_count_flops_sees_attention_that_sdpa_would_hide(gpu):
    """Without the switch to math, FlopCounterMode on CPU misses sdpa's attention matmuls; the
    difference is exactly the formula's attention term (4 B L^2 d per layer)."""
    from torch.utils.flop_counter import FlopCounterMode

    vit, p = _tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as plain:
        vit(images)
    counted = gpu.count_flops(lambda: vit(images), vit)
    L = (32 // p.patch_size) ** 2 + 1
    assert counted - plain.get_total_flops() == p.depth * 4 * 2 * L * L * p.width


def test_training_step_is_about_three_forwards(gpu):
    """Forward + backward counts 2-3x the forward (the patch embedding's input needs no gradient)."""
    vit, _ = _tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    fwd = gpu.count_flops(lambda: vit(images), vit)
    step = gpu.count_flops(lambda: vit(images).float().pow(2).mean().backward(), vit)
    assert 2.8 * fwd < step <= 3 * fwd


def test_transformer_flops_formula_scales(gpu):
    f = gpu.transformer_forward_flops
    assert f(2, 10, 64, 3) == 2 * f(1, 10, 64, 3)  # linear in batch
    assert f(1, 10, 64, 6) == 2 * f(1, 10, 64, 3)  # and in depth
    # ViT-B/16 at 224 px: ~17.6 G multiply-adds per image forward (timm / OpenCLIP's figure)
    assert gpu.vit_forward_flops(1, 224, 16, 768, 12) / 2 == pytest.approx(17.6e9, rel=0.02)


def test_table_rows_compute_columns_and_show_errors(gpu):
    Row = gpu.Row
    rows = [
        Row("b", "sdpa", batch=256, step_s=0.25, flops=30e12, peak_bytes=3 * 2**30, vs="1.00x sdpa", note="ok"),
        Row("b", "xformers", batch=256, error="UserError: attention backend 'xformers' is not available"),
        Row("e", "pytest -m gpu", note="3 passed | in 5s"),
    ]
    lines = gpu.format_table(rows, peak_flops=200e12)
    assert len(lines) == 2 + len(rows)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(gpu.COLUMNS)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(c) == len(gpu.COLUMNS) for c in cells)  # a '|' inside a note does not split a cell
    sdpa = dict(zip(header, cells[0]))
    assert float(sdpa["ms/step"]) == pytest.approx(250.0)
    assert float(sdpa["samples/s"]) == pytest.approx(256 / 0.25)
    assert float(sdpa["TFLOP/s"]) == pytest.approx(30e12 / 0.25 / 1e12)
    assert float(sdpa["MFU"].rstrip("%")) == pytest.approx(100 * 30e12 / 0.25 / 200e12, abs=0.05)
    assert float(sdpa["peak GiB"]) == pytest.approx(3.0)
    failed = dict(zip(header, cells[1]))
    assert failed["note"].startswith("ERROR UserError: attention backend 'xformers'")
    assert failed["ms/step"] == failed["MFU"] == "-"
    # without a known peak, MFU is '-' but throughput is still shown
    unknown = dict(zip(header, [c.strip() for c in gpu.format_table(rows[:1], None)[2].strip("|").split("|")]))
    assert unknown["MFU"] == "-" and unknown["TFLOP/s"] == sdpa["TFLOP/s"]


def test_a_failing_part_becomes_an_error_row(gpu, capsys):
    def broken():
        raise ModuleNotFoundError("No module named 'xformers'")

    [row] = gpu.run_part("b", "attention backends", broken)
    assert row.part == "b" and row.error == "ModuleNotFoundError: No module named 'xformers'"
    assert "Traceback" in capsys.readouterr().err
    ok = gpu.run_part("e", "tests", lambda: [gpu.Row("e", "tests", note="fine")])
    assert ok[0].error is None and ok[0].note == "fine"


def test_quick_takes_fewer_steps_and_explicit_counts_win(gpu):
    full, quick = gpu.parse_args([]), gpu.parse_args(["--quick"])
    for name in ("steps_a", "steps_b", "steps_c", "rounds_c", "steps_d", "rounds_d"):
        assert getattr(quick, name) < getattr(full, name), name
    assert gpu.parse_args(["--quick", "--steps-a", "40"]).steps_a == 40
    assert gpu.parse_args(["--parts", "b,e"]).parts == ["b", "e"]


# toy sizes for running every part on CPU: the same code paths as on a GPU, minus the CUDA timers and memory
TOY_TOWERS = [("vision.width", 32), ("vision.depth", 1), ("vision.heads", 2), ("text.width", 32), ("text.depth", 1),
              ("text.heads", 2), ("train.batch_size", 8)]
TOY_SETS = {
    "clip_baseline": TOY_TOWERS + [("itc.embed_dim", 32)],
    "timix_sweep": TOY_TOWERS + [("fusion.depth", 1), ("fusion.heads", 2), ("itc.embed_dim", 32), ("tpp.block", 0)],
}
TOY_VIT_B16 = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, text_width=32, text_depth=1, text_heads=2,
                   text_len=16, embed_dim=32)


@pytest.mark.integration
def test_every_part_runs_on_cpu_at_toy_sizes(gpu, tmp_path, monkeypatch):
    """Parts a-d end to end on CPU (the wiring a GPU run depends on: the gpu profiles, compile, fit,
    the hand loop, the backend switch, the FLOP count): rows with times and FLOPs, xformers' row
    carrying its error, the TiMix variants counted as more work than the baseline."""
    monkeypatch.setattr(gpu, "DEVICE", torch.device("cpu"))
    torch.manual_seed(0)
    args = gpu.parse_args(["--steps-a", "3", "--batch-b", "2", "--steps-b", "2", "--warmup-b", "1", "--steps-c", "3",
                           "--rounds-c", "1", "--steps-d", "3", "--rounds-d", "1"])
    bench = gpu.Bench(args, tmp_path, sets=TOY_SETS, vit_b16=TOY_VIT_B16)
    rows = [r for part in "abcd" for r in gpu.run_part(part, gpu.PARTS[part], getattr(bench, f"part_{part}"))]
    by_case = {r.case: r for r in rows}
    errors = {r.case: r.error for r in rows if r.error}
    assert set(errors) == {"ViT-B/16 CLIP step, xformers"}, errors  # the other rows go on without it
    assert "attention backend 'xformers' needs CUDA" in errors["ViT-B/16 CLIP step, xformers"]
    for r in rows:
        if not r.error:
            assert r.step_s > 0 and r.flops > 0 and r.batch, r
    # part b: one model, one count, whatever the backend; the counted step is the towers plus a little
    sdpa, math_ = by_case["ViT-B/16 CLIP step, sdpa"], by_case["ViT-B/16 CLIP step, math"]
    assert sdpa.flops == math_.flops and sdpa.vs == "1.00x sdpa"
    # parts a and c train the same model: the same FLOPs per step; c's loss check passed
    assert by_case["clip_baseline gpu profile (engine fit)"].flops == by_case["engine step (clip gpu profile)"].flops
    assert by_case["engine step (clip gpu profile)"].vs.endswith("engine/hand")
    assert "loss check: engine" in by_case["hand-written loop (same model)"].note
    # part d: a mixing step runs the image tower again on the mixed images: more FLOPs than the baseline's
    d = {r.case.rsplit(", ", 1)[1]: r for r in rows if r.part == "d"}
    assert set(d) == set(gpu.VARIANTS_D)
    assert d["cutmix"].flops > d["baseline"].flops and d["timix"].flops > d["baseline"].flops
    assert d["baseline"].vs == "1.000 vs baseline"
    lines = gpu.format_table(rows, 1e12)
    assert len(lines) == 2 + len(rows)
