"""Execute every numbered notebook with papermill (kernel python3, smoke=True) and check how each is committed.

The executed copies land in build/notebooks/ (ignored by git) so you can open what ran.
Run: `bash tools/test.sh tests/test_notebooks.py`.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
OUT = ROOT / "build" / "notebooks"


def ids(paths):
    return [p.stem for p in paths]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no NN_*.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_committed_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "outputs not stripped"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert "smoke" in "".join(params[0]["source"])
    assert "import longcat_lab" in "".join("".join(c["source"]) for c in code) or "from longcat_lab" in "".join(
        "".join(c["source"]) for c in code
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_runs(path):
    import papermill

    OUT.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(path),
        str(OUT / path.name),
        kernel_name="python3",
        parameters={"smoke": True},
        cwd=str(path.parent),
        progress_bar=False,
    )
