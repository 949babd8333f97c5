"""Evaluation: perplexity (WikiText-2 protocol) and, later, zero-shot tasks and sparsity reports."""

from sparsefit.evaluate.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
