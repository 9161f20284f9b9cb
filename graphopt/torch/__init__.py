"""Optional torch helpers (test-model zoo, ONNX export); these modules require torch."""
