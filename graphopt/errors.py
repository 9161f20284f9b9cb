"""Error types.

`GraphoptError` and its subclasses mean bad user input (a model, data file, path or option the user
gave); the CLI turns them into one line on stderr and exit code 2. Any other exception is a bug and
exits with code 1.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Bad user input: reported as one clear line, exit code 2."""


class ModelLoadError(GraphoptError):
    """The model file is missing, truncated, invalid or unsafe to load."""


class CandidateLoadError(ModelLoadError):
    """onnxruntime cannot load the candidate of a comparison (under `optimize`, graphopt's own output: a bug)."""


class UnsafeExternalDataError(ModelLoadError):
    """External data points outside the model's directory or past the end of its file."""


class DataError(GraphoptError):
    """A data file or feed does not match the model's inputs."""


class OutputPathError(GraphoptError):
    """The output path would overwrite the input model or cannot be written."""


class OptionError(GraphoptError):
    """An option value is out of range or inconsistent with the model."""


class MetricError(GraphoptError):
    """A user's metric could not be loaded, raised, or returned something other than named numbers."""


class PassInputError(GraphoptError):
    """A pass refused the user's input; the message names the pass."""


class PassFailedError(RuntimeError):
    """A pass broke an invariant (a bug); the message names the pass and those before it."""


class UnsupportedOpError(GraphoptError):
    """An op, attribute or element type the torch interpreter (--repair) cannot run or train through."""
