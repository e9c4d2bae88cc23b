"""Pick the strength for a utility budget: the largest lam whose perplexity on neutral text stays within budget.

The paper compares methods at matched utility ("toxicity at +5% perplexity") and leaves lam to a sweep; reviewers
asked for a lam-free way to use a steerer. `calibrate_strength` answers "how hard can I steer before neutral text
suffers by more than x%?" with a few teacher-forced perplexity evaluations: doubling from `start` until the budget
is exceeded, then bisecting. A gated steerer (DSAS) leaves neutral text alone, so its calibrated lam is larger
than a vanilla one's, which is where its better toxicity at matched perplexity comes from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dsas.steerer import Steerer

MAX_HALVINGS = 20
"""How far below `start` the search goes (start / 2**20) before it reports strength 0."""


@dataclass
class Calibration:
    """Result of `calibrate_strength`.

    strength:  the largest lam found within budget (0.0 when even start / 2**20 exceeds it).
    ppl:       perplexity on the texts at that strength; base_ppl: unsteered.
    budget:    the allowed relative increase (ppl <= base_ppl * (1 + budget)).
    saturated: True when `max_strength` itself is within budget (the steerer may allow more).
    evaluated: every (strength, perplexity) evaluated, in order.
    """

    strength: float
    ppl: float
    base_ppl: float
    budget: float
    saturated: bool
    evaluated: list[tuple[float, float]] = field(default_factory=list)

    @property
    def increase(self) -> float:
        """Relative perplexity increase at `strength`."""
        return self.ppl / self.base_ppl - 1.0


def calibrate_strength(
    steerer: Steerer,
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | None = None,
    *,
    max_ppl_increase: float = 0.05,
    start: float = 1.0,
    max_strength: float = 64.0,
    iters: int = 6,
    max_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> Calibration:
    """The largest strength lam in (0, max_strength] with perplexity(texts) <= (1 + max_ppl_increase) * unsteered.

    texts:  neutral text the steering should not hurt (default: 32 embedded Wikipedia lead paragraphs).
    Search: lam = start, 2 start, 4 start, ... until the budget is exceeded (or max_strength), or start / 2,
    start / 4, ... until it is met; then `iters` bisection steps between the last lam within budget and the first
    beyond it, so the answer is within a factor 1 + 2**-iters of the edge. Perplexity need not be monotone in lam:
    the result is always a lam that was evaluated and found within budget, never an extrapolation.
    """
    from dsas.eval.perplexity import load_wiki_paragraphs, perplexity

    if not (max_ppl_increase > 0 and math.isfinite(max_ppl_increase)):
        raise ValueError(
            f"max_ppl_increase must be a positive fraction (0.05 = +5%), got {max_ppl_increase}."
        )
    if not (0 < start <= max_strength):
        raise ValueError(f"Need 0 < start <= max_strength, got start={start}, max_strength={max_strength}.")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}.")
    if not steerer.steered:
        import warnings

        warnings.warn(
            "This steerer steers no site (no regulator passed its accuracy threshold): every strength leaves "
            "the model unsteered, so the search ends at max_strength. Refit with more or cleaner prompts, a "
            "lower acc_threshold, or inactive='vanilla'.",
            stacklevel=2,
        )
    texts = list(texts) if texts is not None else load_wiki_paragraphs(n=32, seed=0)
    if not texts:
        raise ValueError("calibrate_strength needs at least one neutral text.")

    def ppl(lam: float | None) -> float:
        if lam is None:
            return perplexity(
                model, tokenizer, texts, max_tokens=max_tokens, batch_size=batch_size, progress=False
            )
        with steerer.apply(model, strength=lam):
            return perplexity(
                model, tokenizer, texts, max_tokens=max_tokens, batch_size=batch_size, progress=False
            )

    from tqdm.auto import tqdm

    bar = tqdm(desc="calibrating strength", disable=not progress, unit="eval")
    evaluated: list[tuple[float, float]] = []

    def within(lam: float) -> bool:
        p = ppl(lam)
        evaluated.append((lam, p))
        bar.update(1)
        bar.set_postfix(strength=f"{lam:.3g}", ppl=f"{p:.3f}")
        return p <= limit

    base = ppl(None)
    bar.update(1)
    if not math.isfinite(base):
        raise ValueError(f"The unsteered perplexity is {base}: check the texts and the model.")
    limit = base * (1.0 + max_ppl_increase)
    # Bracket: double from `start` while within budget, or halve from it until within budget.
    ok, bad = 0.0, None
    if within(start):
        ok = lam = start
        while lam < max_strength:
            lam = min(2.0 * lam, max_strength)
            if not within(lam):
                bad = lam
                break
            ok = lam
    else:
        bad = lam = start
        for _ in range(MAX_HALVINGS):
            lam /= 2.0
            if within(lam):
                ok = lam
                break
            bad = lam
    # Bisect between the last strength within budget and the first beyond it.
    if bad is not None and ok > 0:
        lo, hi = ok, bad
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if within(mid):
                lo = ok = mid
            else:
                hi = mid
    bar.close()
    at = dict(evaluated)
    return Calibration(
        strength=ok,
        ppl=at.get(ok, base),
        base_ppl=base,
        budget=max_ppl_increase,
        saturated=bad is None,
        evaluated=evaluated,
    )
