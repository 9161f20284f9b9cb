"""Graph passes and the methods built from them: the pass interface (base), the manager, method
declarations (methods), one sub-package per family, and the catalogue that registers them all."""

from __future__ import annotations

from graphopt.passes.base import REGISTRY, Pass, PassContext, PassResult, register
from graphopt.passes.catalog import PREPASSES, get_pass, names, normalising_passes
from graphopt.passes.manager import PassManager, PassRecord
from graphopt.passes.methods import METHODS, Method, Options, option, register_method

__all__ = ["METHODS", "PREPASSES", "REGISTRY", "Method", "Options", "Pass", "PassContext", "PassManager",
           "PassRecord", "PassResult", "get_pass", "names", "normalising_passes", "option", "register",
           "register_method"]
