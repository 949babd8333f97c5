"""Test hook for processes started by tests/test_distributed.py (on PYTHONPATH only there): with
``SPARSEFIT_TEST_INTERRUPT_FIT=N``, EBFT's N-th block fit raises KeyboardInterrupt, as Ctrl-C would, in every rank;
with ``SPARSEFIT_TEST_INTERRUPT_LOSS=N``, the N-th batch loss of a whole-model fit does."""

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

if os.environ.get("SPARSEFIT_TEST_INTERRUPT_LOSS"):  # the N-th batch loss of a whole-model fit, in every rank
    from sparsefit.recover import training

    _real_loop = training.train_loop
    _losses = []

    def _interrupting_loop(module, params, loss_of, *args, **kwargs):
        def counted(index):
            _losses.append(1)
            if len(_losses) == int(os.environ["SPARSEFIT_TEST_INTERRUPT_LOSS"]):
                raise KeyboardInterrupt
            return loss_of(index)

        return _real_loop(module, params, counted, *args, **kwargs)

    training.train_loop = _interrupting_loop
