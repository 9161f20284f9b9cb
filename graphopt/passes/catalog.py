"""The catalogue of passes: importing it registers every pass and every method (each room registers its
own on import); `get_pass` and `names` look them up, `normalising_passes` builds the pre-pass sequence.

`PREPASSES` is the normalising sequence every method runs first.
"""

from __future__ import annotations

from graphopt.errors import OptionError
from graphopt.passes.base import REGISTRY, Pass
from graphopt.passes.channels import magnitude  # noqa: F401  (magnitude, random)
from graphopt.passes.cob import prune as cob  # noqa: F401
from graphopt.passes.exprune import prune as exprune  # noqa: F401
from graphopt.passes.prepasses import (constant_fold, dead_code, fold_batchnorm,  # noqa: F401
                                       normalize_constants, remove_identity, select_through_concat,
                                       shape_inference)
from graphopt.passes.snp import prune as snp  # noqa: F401
from graphopt.passes.quantize import qdq as quantize  # noqa: F401
from graphopt.passes.sparse import dead_units, omp  # noqa: F401

PREPASSES = [
    "normalize_constants",
    "remove_identity",
    "constant_fold",
    "fold_batchnorm",
    "dead_code",
    "shape_inference",
    "select_through_concat",
]


def get_pass(name: str) -> Pass:
    """A fresh instance of the pass registered as `name`."""
    if name not in REGISTRY:
        raise OptionError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]()


def names(kind: str) -> list[str]:
    return sorted(name for name, cls in REGISTRY.items() if cls.kind == kind)


def normalising_passes() -> list[Pass]:
    """Fresh instances of the normalising pre-passes, in order."""
    return [get_pass(name) for name in PREPASSES]
