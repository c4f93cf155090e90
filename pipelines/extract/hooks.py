"""Capture intermediate outputs of any nn.Module by name, and stop its forward early.

`with capture(model, {"mid": "mid_block"}, stop_after="mid") as out: model(x)` records the output
of each named submodule while the with-block runs. The hook of `stop_after` raises a private
exception that `capture` swallows, so a forward we do not own ends right after the last block we
need (down+mid of SD is about a quarter of the UNet's FLOPs). Hooks are removed on every exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the hook of the last requested module; never leaves `capture`."""


@contextmanager
def capture(
    model: nn.Module, modules: Mapping[str, str], stop_after: str | None = None,
    element: Mapping[str, int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict that fills with `name -> detached output` of `model.get_submodule(path)` for
    every `name: path` in `modules`. A module returning a tuple (diffusers down blocks return
    (hidden_states, residuals)) is recorded as its first element, or as element `element[name]`
    (joint-attention blocks return (text tokens, image tokens)). With `stop_after`, the forward
    ends right after that module runs and the rest of the with-block is skipped."""
    if stop_after is not None and stop_after not in modules:
        raise ValueError(f"stop_after={stop_after!r} is not one of the captured modules {list(modules)}")
    targets = {name: model.get_submodule(path) for name, path in modules.items()}  # fails before any hook exists
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            outputs[name] = (output[(element or {}).get(name, 0)] if isinstance(output, tuple) else output).detach()
            if name == stop_after:
                raise _StopForward

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in targets.items()]
    try:
        yield outputs
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
