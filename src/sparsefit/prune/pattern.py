"""Sparsity patterns: unstructured, N:M (keep N of every M consecutive input weights of a row), or ``structured``
(whole attention heads and FFN channels removed: the layers get smaller, see :mod:`sparsefit.prune.structured`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sparsefit.errors import UsageError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern. ``n == m == 0`` means unstructured; otherwise keep ``n`` of every ``m``.

    ``slim``: the structured pattern (heads and channels removed, the matrices sliced smaller); no zeros, no masks.
    """

    n: int = 0
    m: int = 0
    slim: bool = False

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
        if self.slim:
            return "structured"
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


UNSTRUCTURED = Pattern()
STRUCTURED = Pattern(slim=True)


def parse_pattern(text: str | Pattern) -> Pattern:
    """``"unstructured"``, ``"structured"`` or ``"N:M"`` (1 <= N < M) to a :class:`Pattern`; UsageError else."""
    if isinstance(text, Pattern):
        return text
    if not isinstance(text, str):
        raise UsageError(f"pattern {text!r} is not understood; use 'unstructured', 'structured' or 'N:M' such as '2:4'")
    if text.strip().lower() == "unstructured":
        return UNSTRUCTURED
    if text.strip().lower() == "structured":
        return STRUCTURED
    match = _NM.match(text)
    if not match:
        raise UsageError(f"pattern {text!r} is not understood; use 'unstructured', 'structured' or 'N:M' such as "
                         f"'2:4' or '4:8'")  # fmt: skip
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
