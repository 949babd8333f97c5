"""Sparsity patterns: unstructured, or N:M (keep N of every M consecutive input weights of a row)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sparsefit.errors import UsageError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern. ``n == m == 0`` means unstructured; otherwise keep ``n`` of every ``m``."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        """True for N:M patterns (the pattern, not a sparsity argument, decides how many weights go)."""
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The fraction of weights an N:M pattern removes; None for unstructured."""
        return (self.m - self.n) / self.m if self.structured else None

    def validate_width(self, in_features: int, name: str | None = None) -> None:
        """Raise UsageError when N:M groups do not tile a layer of ``in_features`` inputs."""
        if self.structured and in_features % self.m != 0:
            where = f"layer {name} " if name else "a layer "
            raise UsageError(
                f"pattern {self} does not fit {where}with {in_features} input features: "
                f"M={self.m} must divide the input width"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


UNSTRUCTURED = Pattern()


def parse_pattern(text: str | Pattern) -> Pattern:
    """``"unstructured"`` or ``"N:M"`` (1 <= N < M) to a :class:`Pattern`; UsageError on anything else."""
    if isinstance(text, Pattern):
        return text
    if not isinstance(text, str):
        raise UsageError(f"pattern {text!r} is not understood; use 'unstructured' or 'N:M' such as '2:4'")
    if text.strip().lower() == "unstructured":
        return UNSTRUCTURED
    match = _NM.match(text)
    if not match:
        raise UsageError(f"pattern {text!r} is not understood; use 'unstructured' or 'N:M' such as '2:4' or '4:8'")
    n, m = int(match.group(1)), int(match.group(2))
    if m < 2 or n < 1 or n >= m:
        raise UsageError(f"pattern {text!r} is invalid: N:M needs 1 <= N < M and M >= 2 (N weights kept of every M)")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as a float when it lies in [0, 1); UsageError otherwise."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise UsageError(f"sparsity {sparsity!r} is not a number; use a fraction in [0, 1) such as 0.5") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise UsageError(f"sparsity {sparsity} is outside [0, 1); use a fraction such as 0.5 for 50%")
    return value
