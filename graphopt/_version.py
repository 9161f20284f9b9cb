"""graphopt's version: the one place it is written (pyproject reads it; the package and the CLI show it)."""

__version__ = "0.1.0"
