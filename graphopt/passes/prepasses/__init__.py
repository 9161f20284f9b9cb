"""Normalising passes every method runs first: constants as initializers, identities removed, constants
folded, BatchNorm folded into the producing Conv/Gemm, dead code removed, shapes inferred."""
