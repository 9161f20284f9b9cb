"""graphopt's custom ONNX operators."""
