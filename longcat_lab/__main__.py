"""`python -m longcat_lab ...` is the `longcat-lab` command; torchrun starts training workers this way
(`torchrun --nproc-per-node 2 -m longcat_lab train --preset tiny --out runs/tiny2`)."""

import sys

from longcat_lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
