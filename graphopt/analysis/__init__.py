"""Read-only questions about a graph: MACs and parameters, channel groups."""
