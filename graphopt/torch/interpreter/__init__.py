"""A small ONNX interpreter in torch (graphopt.torch.interpreter.module): what --repair trains through."""
