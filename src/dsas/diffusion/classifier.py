"""A tiny CNN digit classifier: the offline stand-in for CLIP in the diffusion experiment.

Its probability for the intended class is the "concept score" of a generated image, and its penultimate features
give an image–image similarity (the analogue of the paper's CLIP-based IMGScore). Stored as safetensors + a JSON
config, never pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dsas.diffusion.images import IMAGE_SIZE, NUM_CLASSES

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_DIR = ASSETS / "digits_classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of :class:`DigitsClassifier` (what the JSON config must hold to rebuild it)."""

    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    image_size: int = IMAGE_SIZE
    num_classes: int = NUM_CLASSES


class DigitsClassifier(nn.Module):
    """conv-pool-conv-pool-MLP on `[B, 1, 16, 16]` images in [0, 1]."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        c1, c2 = self.config.channels
        side = self.config.image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * side * side, self.config.hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.config.hidden, self.config.num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features `[B, hidden]` (used for the feature-space image similarity)."""
        return self.features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `[B, num_classes]`."""
        return self.head(self.embed(images))

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write `model.safetensors` + `config.json` (architecture, plus free-form training metadata)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))
        cfg = {"architecture": asdict(self.config), "training": metadata or {}}
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path = CLASSIFIER_DIR) -> DigitsClassifier:
        """Rebuild from a directory written by :meth:`save`; returned in eval mode."""
        path = Path(path)
        arch = json.loads((path / CONFIG_NAME).read_text())["architecture"]
        arch["channels"] = tuple(arch["channels"])
        model = cls(ClassifierConfig(**arch))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model.eval()


@lru_cache(maxsize=1)
def load_digits_classifier() -> DigitsClassifier:
    """The shipped classifier (cached: metrics call this on every batch). Do not train the returned module."""
    model = DigitsClassifier.load(CLASSIFIER_DIR)
    model.requires_grad_(False)
    return model
