"""Reading a pretrained state dict from a local file (.safetensors, or .pth/.pt with weights_only).

Shared by the encoder node kinds, which must not import each other. Never touches the network.
"""

from __future__ import annotations

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
