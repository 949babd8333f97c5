"""Test hook for processes started by tests/test_distributed.py (on PYTHONPATH only there): with
``SPARSEFIT_TEST_INTERRUPT_FIT=N``, EBFT's N-th block fit raises KeyboardInterrupt, as Ctrl-C would, in every rank."""

import os

if os.environ.get("SPARSEFIT_TEST_INTERRUPT_FIT"):
    from sparsefit.recover import ebft

    _real = ebft.fine_tune_block
    _calls = []

    def _interrupting(*args, **kwargs):
        _calls.append(1)
        if len(_calls) == int(os.environ["SPARSEFIT_TEST_INTERRUPT_FIT"]):
            raise KeyboardInterrupt
        return _real(*args, **kwargs)

    ebft.fine_tune_block = _interrupting
