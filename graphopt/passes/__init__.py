"""Graph passes. Each module registers its passes on import; `load_all` imports them all.

`PREPASSES` is the normalising sequence every method runs first.
"""

from __future__ import annotations

import importlib

from graphopt.passes.base import REGISTRY, Pass, PassContext, PassResult, get_pass, names, register
from graphopt.passes.manager import PassManager, PassRecord

PREPASSES = [
    "normalize_constants",
    "remove_identity",
    "constant_fold",
    "fold_batchnorm",
    "dead_code",
    "shape_inference",
]

# the modules that register passes (each pre-pass lives in a module of its own name)
_MODULES = [*(f"prepasses.{name}" for name in PREPASSES), "channels.magnitude", "snp.prune", "sparse.dead_units",
            "sparse.omp", "cob.prune", "exprune.prune"]


def normalising_passes() -> list[Pass]:
    """Fresh instances of the normalising pre-passes, in order."""
    return [get_pass(name) for name in PREPASSES]


def load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"graphopt.passes.{module}")


__all__ = ["PREPASSES", "REGISTRY", "Pass", "PassContext", "PassManager", "PassRecord", "PassResult",
           "get_pass", "load_all", "names", "normalising_passes", "register"]
