"""The one place a `--device` option becomes a torch device."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The torch device `name`, refused (never replaced by another) when this machine cannot use it."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available to this torch build ({torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return device
