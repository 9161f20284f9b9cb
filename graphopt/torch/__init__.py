"""Optional torch helpers (test-model zoo, ONNX export, the ONNX interpreter and --repair); they require torch."""
