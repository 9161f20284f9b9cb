"""Static INT8 quantization (QDQ) as the last step of a pipeline, calibrated on the run's data."""
