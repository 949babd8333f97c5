"""Running sparse models faster: a compiled sparse linear layer for CPU decoding (``kernel``, ``sparse_linear``),
choosing it where it is faster (``choose``), loading a checkpoint onto it (``load``) and timed greedy decoding
(``generate``). ``sparsefit.load`` is :func:`sparsefit.infer.load.load`."""
