"""Subspace node pruning: unit ordering by unique variance (ZCA, LDLᵀ), the global budget, and the
least-squares reconstruction of pruned units folded into every consumer."""
