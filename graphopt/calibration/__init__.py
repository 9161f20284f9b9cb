"""onnxruntime sessions, data sources and statistics gathered from calibration runs."""
