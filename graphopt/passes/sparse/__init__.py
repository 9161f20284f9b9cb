"""Unstructured sparsity and exact dead-unit removal: one-shot magnitude pruning of individual weights
(IUNET's OMP) and the removal of units nobody reads or that are constant."""
