"""`python -m longcat_lab.cli ...` is the `longcat-lab` command too."""

import sys

from longcat_lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
