"""Local files nodes and the engine read: a pretrained state dict (.safetensors, or .pth/.pt with
weights_only), a param's path resolved against the graph file's folder, and the sha256 of a file
(the fingerprints that make what a node reads part of its identity, and checkpoint verification).

Shared by node kinds, which must not import each other, by the file readers and by the training loop. Never touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from vlpgraph.errors import UserError


def read_state_dict(path: str, kind: str) -> dict[str, torch.Tensor]:
    """A dict of tensors from ``path``; unwraps {"state_dict"|"model"|"module": ...}; UserError on any problem."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{kind}: pretrained checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{kind}: cannot read checkpoint {p}: {msg}")
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{kind}: {p} is not a state dict of tensors")
    return sd


def load_matching(module: torch.nn.Module, sd: dict[str, torch.Tensor], *, kind: str, path: str, what: str,
                  decided_by: str, log) -> None:
    """Load a pretrained state dict ``sd`` (prefixes already stripped) into ``module``: every weight of the
    module must be there with its shape, else a UserError says which (``what``: "this ViT"; ``decided_by``:
    the params that set the shapes, e.g. "width/depth/heads"); entries the module does not have are
    ignored with a note. Shared by the towers that load local checkpoints (encoder.vit, .text, .lm)."""
    own = module.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise UserError(f"{kind}: {path} does not fit these params ({decided_by}?): {bad[0]}")
    missing = [k for k in own if k not in sd]
    if missing:
        raise UserError(f"{kind}: {path} lacks {len(missing)} weights of {what}, e.g. {missing[0]!r}")
    unexpected = [k for k in sd if k not in own]
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
    if unexpected:
        log(f"{kind}: ignored {len(unexpected)} checkpoint entries not in {what} (e.g. {unexpected[0]!r})")


def resolve_path(path: str, base_dir: Path | str | None) -> Path:
    """``path`` with ``~`` expanded; a relative one is taken relative to ``base_dir`` (the graph file's
    folder), not to the working directory. ``base_dir`` None: the working directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def sha256_of(path: Path | str) -> str:
    """The sha256 hex digest of the file's bytes, read now (no memo)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    return sha256_of(path)


def file_sha256(path: Path) -> str:
    """The sha256 of the file's bytes, or ``"missing"`` when there is no file at ``path``.

    Content, not size + mtime: a checkpoint copied to another folder or machine (new mtime) is the
    same file, and one replaced in place by another of the same size is not. Measured on this
    project's 2-core machine: 0.11 s per 100 MB with a warm page cache (~0.5 s for a BERT-base
    checkpoint). Memoised per process on (path, size, mtime, ctime, inode), so a sweep's trials and
    repeated graph loads hash each file once while a replaced file is hashed again.
    """
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if not Path(path).is_file():
        return "missing"
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def files_fingerprint(files: dict[str, str | None], base_dir: Path) -> dict[str, str] | None:
    """A node kind's ``fingerprint`` for the local files its params name: ``{param: sha256}`` (or
    ``"missing"``) for each param that names a file, paths resolved against ``base_dir``; None when
    none does, so a node that reads no file keeps the hash it always had."""
    out = {param: file_sha256(resolve_path(path, base_dir)) for param, path in files.items() if path}
    return out or None
