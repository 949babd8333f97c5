"""``python -m sparsefit`` (and ``torchrun --nproc-per-node N -m sparsefit``): the command line."""

from sparsefit.cli import main

main()
