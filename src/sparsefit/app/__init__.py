"""The application layer: jobs (prune, recover, evaluate, run, compare), recipes, reports and defaults.

Built on the methods (``prune/``, ``recover/``) and the low layer (``walk/``); ``cli.py`` sits on top.
Progress reaches it as callbacks (:mod:`sparsefit.progress`); nothing here draws.
"""
