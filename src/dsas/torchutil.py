"""Small torch helpers shared by every module: where a model lives, the steerable tensor inside a module's
output, and the one way to cut a forward pass short."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised after the last site of interest has run, so the rest of the forward pass (the LM head, the
    decoder half of a UNet) is skipped; the caller catches it around the model call."""


def module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer; None for a module that holds neither."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


def model_device(model: nn.Module) -> torch.device:
    """Where inputs to `model` go: its first parameter's device (CPU for a model without parameters)."""
    return module_device(model) or torch.device("cpu")


def output_tensor(out: Any, index: int | None = None) -> torch.Tensor:
    """The tensor to steer inside a module output (a tensor, or a tuple/list whose element `index` or 0)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out:
        t = out[index or 0]
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(
        f"Site output of type {type(out).__name__} holds no tensor at index {index or 0}; "
        "pick another site or a tuple index with 'name:i'."
    )


def replace_output(out: Any, new: torch.Tensor, index: int | None = None) -> Any:
    """The module output with the steered tensor put back in place (tuples stay tuples)."""
    if isinstance(out, torch.Tensor):
        return new
    items = list(out)
    items[index or 0] = new
    return tuple(items) if isinstance(out, tuple) else items
