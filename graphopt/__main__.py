"""`python -m graphopt ...`: the same command line as the `graphopt` script."""

import sys

from graphopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
