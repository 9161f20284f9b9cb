"""ExPrune: per-input dynamic neuron pruning. Calibration of probe lengths and thresholds, the tolerance
search on held-out samples, and the replacement of Linear/Conv+ReLU layers by graphopt's ExPrune ops."""
