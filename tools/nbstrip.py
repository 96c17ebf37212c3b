"""Git clean filter for the notebooks (the set-up installs it; .gitattributes applies it to notebooks/*.ipynb): reads a
notebook on stdin and writes what git stores, so running a notebook in JupyterLab never leaves the tracked file
modified. It drops outputs and execution counts (cells marked NBVAL_CHECK_OUTPUT keep their outputs, counted 1, as
the tests compare them), the widget state JupyterLab may save and per-run cell metadata, and puts a parameters cell's
`smoke = True` back to `smoke = False`. The file on disk keeps everything; only what git sees is clean.

Install by hand: git config filter.nbstrip.clean "python tools/nbstrip.py"   Check: python tools/nbstrip.py < NB
Input that is not a notebook passes through unchanged, so the filter can never block a commit.
"""

import json
import re
import sys

RUN_METADATA = ("execution", "scrolled", "collapsed", "ExecuteTime")
SMOKE_ON = re.compile(r"^smoke = True\b")


def strip(nb: dict) -> dict:
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        for key in RUN_METADATA:
            cell.get("metadata", {}).pop(key, None)
        if cell.get("cell_type") != "code":
            continue
        source = cell["source"] if isinstance(cell["source"], list) else cell["source"].splitlines(keepends=True)
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = [SMOKE_ON.sub("smoke = False", line) for line in source]
            cell["source"] = source
        if "NBVAL_CHECK_OUTPUT" in "".join(source) and cell.get("outputs"):
            cell["execution_count"] = 1
            for out in cell["outputs"]:
                if "execution_count" in out:
                    out["execution_count"] = 1
        else:
            cell["outputs"], cell["execution_count"] = [], None
    return nb


def main() -> None:
    raw = sys.stdin.buffer.read()
    try:
        nb = json.loads(raw)
    except ValueError:
        nb = None
    if not isinstance(nb, dict) or "cells" not in nb:
        sys.stdout.buffer.write(raw)
        return
    # The layout nbformat writes (and the committed notebooks use): sorted keys, indent 1, UTF-8 as is.
    sys.stdout.buffer.write((json.dumps(strip(nb), sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode())


if __name__ == "__main__":
    main()
