"""Prompt sets: the three sets DSAS is fitted on (source, target, control) plus held-out evaluation prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class PromptSets:
    """The sets a steerer is fitted on.

    source:  inputs that show the behaviour to remove (e.g. toxic text); positive class of the DSAS regulator.
    target:  inputs that show the behaviour wanted; with `source`, they define the steering map.
    control: neutral inputs steering must leave untouched; negative class of the regulator.
    eval:    optional held-out prompts by name (e.g. {"toxic": [...], "neutral": [...]}), never used for fitting.
    """

    source: list[str]
    target: list[str]
    control: list[str] = field(default_factory=list)
    eval: dict[str, list[str]] = field(default_factory=dict)
    name: str = "custom"

    def validate(self, need_control: bool = True, min_size: int = 2) -> None:
        """Raise a ValueError naming the set and the fix if a set is empty, too small or not all strings."""
        splits = {"source": self.source, "target": self.target}
        if need_control:
            splits["control"] = self.control
        for split, texts in splits.items():
            if not isinstance(texts, list | tuple) or any(not isinstance(t, str) for t in texts):
                raise ValueError(f"PromptSets.{split} must be a list of strings.")
            if len(texts) < min_size:
                raise ValueError(
                    f"PromptSets.{split} has {len(texts)} prompt(s); at least {min_size} are needed "
                    f"(the paper uses 32 per set). Add more {split} prompts."
                )
            if any(not t.strip() for t in texts):
                raise ValueError(f"PromptSets.{split} contains an empty prompt; remove it.")

    def subsample(self, n: int, seed: int = 0) -> PromptSets:
        """At most `n` prompts per fitting set, drawn with a seeded shuffle (a seed resamples the sets)."""
        rng = random.Random(seed)

        def pick(xs: list[str]) -> list[str]:
            xs = list(xs)
            rng.shuffle(xs)
            return xs[:n]

        return PromptSets(pick(self.source), pick(self.target), pick(self.control), dict(self.eval), self.name)
