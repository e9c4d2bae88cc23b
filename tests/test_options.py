"""check_fields: a config field of the wrong type fails at construction, naming Class.field and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsas.options import ALLOW_NONFINITE, OptionError, check_fields


@dataclass
class Cfg:
    pca_dim: int = 5
    C: float = 1.0
    soft: bool = False
    name: str = "x"
    acc_mode: Literal["cv", "train", "holdout"] = "cv"
    steps: int | None = None
    grid: tuple[float, ...] = (1.0, 2.0)
    pair: tuple[int, str] = (1, "a")
    layers: Sequence[int] | None = None
    tags: list[str] = field(default_factory=list)
    opts: dict[str, int] = field(default_factory=dict)
    cap: float = field(default=math.inf, metadata={ALLOW_NONFINITE: True})
    anything: object = None

    def __post_init__(self) -> None:
        check_fields(self)


def test_valid_values_pass():
    Cfg()
    Cfg(pca_dim=3, C=2, soft=True, acc_mode="train", steps=4, grid=(1, 2.5), layers=[0, -1], tags=["a"])
    Cfg(layers=(1, 2), opts={"a": 1}, cap=math.nan, anything=[1])
    Cfg(grid=[1.0, 2], tags=("a",))  # list for tuple and back: a sequence of the right items is what counts
    import numpy as np

    Cfg(pca_dim=np.int64(3), C=np.float32(0.5), steps=np.int32(2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"pca_dim": "5"},
            r"Cfg.pca_dim must be an int, got '5' \(str\). Pass pca_dim=5 \(a number, not a string\)",
        ),
        ({"pca_dim": 5.0}, r"Cfg.pca_dim must be an int, got 5.0 \(float\). Pass pca_dim=5\."),
        ({"pca_dim": True}, r"Cfg.pca_dim must be an int, got True \(bool\). Pass a number, e.g. pca_dim=1"),
        ({"C": "1e-2"}, r"Cfg.C must be a number, got '1e-2' \(str\). Pass C=0.01"),
        ({"C": math.nan}, r"Cfg.C must be a finite number, got nan \(float\). Pass a finite value for C"),
        ({"C": -math.inf}, r"Cfg.C must be a finite number"),
        ({"soft": 1}, r"Cfg.soft must be True or False, got 1 \(int\)"),
        ({"soft": "false"}, r"Cfg.soft must be True or False, got 'false' \(str\). Pass soft=False"),
        ({"name": 3}, r"Cfg.name must be a string"),
        (
            {"acc_mode": "CV"},
            r"Cfg.acc_mode must be one of 'cv', 'train', 'holdout', got 'CV'.*acc_mode='cv'",
        ),
        ({"steps": "10"}, r"Cfg.steps must be an int or None, got '10' \(str\). Pass steps=10"),
        ({"grid": 1.0}, r"Cfg.grid must be a tuple of numbers, got 1.0"),
        (
            {"grid": (1.0, math.nan)},
            r"Cfg.grid must be a tuple of numbers \(item 1 must be a finite number\)",
        ),
        ({"pair": (1, 2)}, r"Cfg.pair must be a tuple of \(an int, a string\)"),
        ({"layers": "0,1"}, r"Cfg.layers must be a list of ints or None"),
        ({"layers": [0, "1"]}, r"item 1 must be an int"),
        ({"tags": "a"}, r"Cfg.tags must be a list of strings"),
        ({"opts": [1]}, r"Cfg.opts must be a dict"),
    ],
)
def test_wrong_types_are_named_with_the_fix(kwargs, match):
    with pytest.raises(OptionError, match=match) as err:
        Cfg(**kwargs)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


@given(st.one_of(st.text(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2), st.floats()))
def test_int_field_takes_only_ints(value):
    with pytest.raises(OptionError, match=r"^Cfg.pca_dim must be an int, got "):
        Cfg(pca_dim=value)


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6))
def test_float_field_takes_finite_numbers(value):
    if math.isfinite(value):
        assert value == Cfg(C=value).C
    else:
        with pytest.raises(OptionError, match="must be a finite number"):
            Cfg(C=value)


def test_unresolvable_annotation_leaves_the_others_checked():
    @dataclass
    class Partial:
        ok: int = 1
        odd: NotDefinedAnywhere = None  # type: ignore[name-defined]  # noqa: F821

        def __post_init__(self) -> None:
            check_fields(self)

    Partial(odd=object())
    with pytest.raises(OptionError, match=r"Partial\.ok must be an int"):
        Partial(ok="x")
