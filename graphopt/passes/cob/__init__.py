"""Change-of-basis pruning: chains of rotation-equivariant ops between linear layers, rotations from
calibration data folded into the weights on both sides (exact), then the trailing dimensions pruned."""
