"""Recovery methods for pruned models; each is one file and one entry in :data:`METHODS`."""

from __future__ import annotations

from sparsefit.errors import UsageError
from sparsefit.recover.base import BlockwiseMethod, ModelMethod, RecoveryContext, RecoveryMethod
from sparsefit.recover.dsnot import DSnoT
from sparsefit.recover.ebft import EBFT
from sparsefit.recover.full import Full
from sparsefit.recover.lora import LoRA
from sparsefit.recover.s2ft import S2FT
from sparsefit.recover.squarehead import SquareHead

METHODS: dict[str, type[RecoveryMethod]] = {
    "ebft": EBFT,
    "dsnot": DSnoT,
    "squarehead": SquareHead,
    "lora": LoRA,
    "s2ft": S2FT,
    "full": Full,
}


def get_method(name: str) -> RecoveryMethod:
    if name not in METHODS:
        raise UsageError(f"recovery method {name!r} is not known; choose one of {', '.join(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "BlockwiseMethod", "ModelMethod", "RecoveryContext", "RecoveryMethod", "get_method"]
