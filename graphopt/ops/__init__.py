"""graphopt's custom ONNX operators: schemas, function bodies, native kernels and their builder.

Sessions that run these ops are built by graphopt.calibration.session (`session_options` registers the
native kernels where they have been built); `library.ensure_functions` installs the function bodies.
"""
