"""Attention backends at ViT shapes: forward+backward time and peak memory, as ratios against sdpa.

    python benchmarks/attention.py                      # CPU here; CUDA (bf16, + xformers) where present
    python benchmarks/attention.py --heads 2 4 6 --lengths 65 197 --repeats 7

Every backend is timed in the same process, alternating the order of backends on each repeat so
drift (thermal, other load) spreads evenly; the median of the repeats is reported. Ratios are
against sdpa measured in the same run.

Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated()`` during one forward+backward, minus what was allocated
  before it (inputs included in the baseline).
- CPU: PyTorch's CPU allocator is invisible to ``tracemalloc``, so each (backend, shape) runs one
  forward+backward in a fresh subprocess and reports how far the process's peak resident set
  (VmHWM in /proc/self/status, reset just before the pass) rose above its resident set before the
  pass (inputs and a warm-up on a tiny shape already counted). It is an RSS high-water mark, so it
  includes allocator slack; compare backends with each other, not with the CUDA numbers. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from vlpgraph.layers.attention import attend, xformers_available


def make_inputs(B, H, L, D, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


def fwd_bwd(backend, q, k, v, mask):
    out = attend(q, k, v, mask=mask, backend=backend)
    out.backward(torch.ones_like(out))
    for t in (q, k, v):
        t.grad = None


def key_padding_mask(B, L, device):
    keep = torch.ones(B, L, dtype=torch.bool, device=device)
    keep[::2, L * 3 // 4:] = False  # every other sample padded by a quarter
    return keep[:, None, None, :]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_shape(backends, B, H, L, D, device, dtype, repeats, use_mask):
    q, k, v = make_inputs(B, H, L, D, device, dtype)
    mask = key_padding_mask(B, L, device) if use_mask else None
    for b in backends:  # warm-up (kernel selection, allocator)
        fwd_bwd(b, q, k, v, mask)
    times = {b: [] for b in backends}
    for r in range(repeats):
        order = backends[r % len(backends):] + backends[: r % len(backends)]  # rotate: alternate order
        for b in order:
            sync(device)
            t0 = time.perf_counter()
            fwd_bwd(b, q, k, v, mask)
            sync(device)
            times[b].append(time.perf_counter() - t0)
    return {b: statistics.median(ts) for b, ts in times.items()}


def cuda_peak(backend, B, H, L, D, dtype, use_mask):
    device = torch.device("cuda")
    q, k, v = make_inputs(B, H, L, D, device, dtype)
    mask = key_padding_mask(B, L, device) if use_mask else None
    fwd_bwd(backend, q, k, v, mask)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(backend, q, k, v, mask)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_child(backend, B, H, L, D, dtype, use_mask) -> int:
    """Runs in a fresh process: growth of the peak resident set (bytes) over one forward+backward.

    The peak (VmHWM) is reset to the current RSS just before the pass by writing 5 to
    /proc/self/clear_refs (Linux >= 4.0); getrusage's ru_maxrss cannot be used because a child
    inherits its parent's high-water mark across fork+exec."""
    device = torch.device("cpu")
    fwd_bwd(backend, *make_inputs(2, H, 8, D, device, dtype), None)  # warm-up on a tiny shape
    q, k, v = make_inputs(B, H, L, D, device, dtype)
    mask = key_padding_mask(B, L, device) if use_mask else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fwd_bwd(backend, q, k, v, mask)
    return (_status_kib("VmHWM") - before) * 1024


def cpu_peak(backend, B, H, L, D, dtype, use_mask) -> int:
    args = json.dumps([backend, B, H, L, D, str(dtype).removeprefix("torch."), use_mask])
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--heads", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65, 197])
    ap.add_argument("--dim", type=int, default=64, help="head dim")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mask", action="store_true", help="add a key-padding mask (half the batch padded by L/4)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: the measuring subprocess
    a = ap.parse_args(argv)

    if a.child:
        backend, B, H, L, D, dt, use_mask = json.loads(a.child)
        print(cpu_peak_child(backend, B, H, L, D, getattr(torch, dt), use_mask))
        return

    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = ["sdpa", "math"]
    if device.type == "cuda" and xformers_available():
        backends.insert(0, "xformers")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mem_how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak-RSS growth in a fresh subprocess"
    print(f"# attention fwd+bwd on {name}, {str(dtype).removeprefix('torch.')}, B={a.batch}, Dh={a.dim}, "
          f"mask={'key-padding' if a.mask else 'none'}; median of {a.repeats} alternating repeats; memory: {mem_how}")
    print(f"# torch {torch.__version__}")
    header = f"{'H':>3} {'L':>4}  {'backend':<9} {'fwd+bwd ms':>10} {'x sdpa':>7}  {'peak MiB':>9} {'x sdpa':>7}"
    print(header)
    print("-" * len(header))
    for H in a.heads:
        for L in a.lengths:
            t = time_shape(backends, a.batch, H, L, a.dim, device, dtype, a.repeats, a.mask)
            mem = {}
            if not a.no_memory:
                for b in backends:
                    fn = cuda_peak if device.type == "cuda" else cpu_peak
                    mem[b] = fn(b, a.batch, H, L, a.dim, dtype, a.mask)
            for b in backends:
                ms = t[b] * 1e3
                rt = t[b] / t["sdpa"]
                if mem:
                    mib = mem[b] / 2**20
                    rm = f"{mem[b] / mem['sdpa']:.2f}" if mem["sdpa"] > 0 else "n/a"
                    mcol = f"{mib:9.1f} {rm:>7}"
                else:
                    mcol = f"{'-':>9} {'-':>7}"
                print(f"{H:>3} {L:>4}  {b:<9} {ms:10.2f} {rt:7.2f}  {mcol}")


if __name__ == "__main__":
    main()
