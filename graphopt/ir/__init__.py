"""The graph IR: safe load/save, onnx-graphsurgeon helpers, shape resolution."""
