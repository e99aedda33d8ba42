"""medalloy's benchmarks: studies that measure it on the real datasets of ``../shared/data``.

Run each from the repository root as a module (``python -m benchmarks.experts --help``); shared
datasets, splits and scoring live in :mod:`benchmarks.common`, and no study imports another.
"""
