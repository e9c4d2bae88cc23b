"""Small torch helpers shared by every module: where a model lives, and the one way to cut a forward pass short."""

from __future__ import annotations

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
