"""Random small ONNX graphs with planted zero, constant and dead channels, and the properties every
optimisation must keep on them: shared by the property tests (tests/test_fuzz.py, hypothesis, a fixed
derandomised budget) and the long seeded sweep (bench/fuzz.py).

- builder: the choices (one `Chooser.integer` draw each), the planting plan, tensors and the graph under
  construction;
- ops: producers (Conv plain/grouped/depthwise, ConvTranspose, Gemm, MatMul with a constant weight) and
  per-channel ops (activations, BatchNormalization, Mul/Add constants, pooling, Resize, Pad);
- graphs: layout ops (Transpose NCHW<->NHWC, Flatten, Reshape, tokens, channel shuffle, Slice), structure
  (residual, squeeze-excitation, gates, Concat, Split) and whole graphs with exporters' quirks;
- checks: the properties (ONNX full check, interface, exactness, targets) and the three method checks.
"""
