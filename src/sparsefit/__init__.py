"""sparsefit: prune Hugging Face causal LMs and recover their quality block by block."""

__version__ = "0.1.0"


def load(path, kernels: str = "auto", values: str | None = None, threads: int | None = None, trust_remote_code=False):
    """A sparse checkpoint as a transformers model with its pruned linears on the sparse CPU kernel
    (``kernels``: auto, sparse or dense); see :func:`sparsefit.infer.load.load`."""
    from sparsefit.infer.load import load as load_model

    return load_model(path, kernels=kernels, values=values, threads=threads, trust_remote_code=trust_remote_code)
