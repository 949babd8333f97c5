"""Inference speed of sparse weights, dense vs sparse kernels (see sparsefit.export.inference_bench).

    .venv/bin/python bench/inference.py [--model DIR] [--device auto|cpu|cuda] [--batches 1,4,16,64]

Writes bench/results/inference.json and .md; the same as `sparsefit bench-inference`.
"""

import sys
from pathlib import Path

from sparsefit.export.inference_bench import main

if __name__ == "__main__":
    main(["--out-dir", str(Path(__file__).parent / "results"), *sys.argv[1:]])
