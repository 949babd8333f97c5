"""sparsefit: prune Hugging Face causal LMs and recover their quality block by block."""

__version__ = "0.1.0"
