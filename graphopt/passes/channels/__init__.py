"""The shared structured-pruning engine: budgets over channel groups, physical removal at every site,
consumer shifts for what removed channels contributed, the magnitude and random methods, and the
recognition of decomposed graphopt functions (RMSNorm, TSRA) that channel rules and CoB reason about."""
