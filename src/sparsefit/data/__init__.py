"""Corpora (built-in offline, local files, HF datasets when reachable), calibration windows, test streams."""

from sparsefit.data.calibration import (
    MODES,
    calib_stream,
    calibration_windows,
    test_stream,
    tokenize_cached,
    window_prefix,
)
from sparsefit.data.corpora import CORPORA, Corpus, get_corpus

__all__ = [
    "CORPORA",
    "MODES",
    "Corpus",
    "calib_stream",
    "calibration_windows",
    "get_corpus",
    "test_stream",
    "tokenize_cached",
    "window_prefix",
]
