"""How the numbered notebooks are committed, and that papermill can still parameterise them.

The notebooks themselves run under nbval: `bash tools/test.sh` runs `pytest --nbval-lax notebooks tests` with
LONGCAT_LAB_SMOKE=1, which executes every cell (the fast `smoke` version) and compares the cells marked
`# NBVAL_CHECK_OUTPUT` with their committed outputs; notebooks/conftest.py saves the executed copies into
build/notebooks/. Run one notebook: `bash tools/test.sh notebooks/01_build_scmoe.ipynb`.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHECK = "# NBVAL_CHECK_OUTPUT"
# Deterministic facts, the same with and without smoke: the released config's parameter and activated-parameter
# table (01), the paper's time per output token through our cost model (04), the KV-cache bytes per token (05).
CHECKED_CELLS = {"01_build_scmoe": 1, "04_overlap_profiling": 1, "05_export_and_generate": 1}


def ids(paths):
    return [p.stem for p in paths]


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell):
    return "".join(cell["source"])


def installed_display_name():
    """The kernel display name tools/env.sh installs; a notebook saying anything else opens already modified."""
    found = re.search(r'--display-name "([^"]+)"', (ROOT / "tools" / "env.sh").read_text())
    assert found, "tools/env.sh installs no kernelspec with --display-name"
    return found.group(1)


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no NN_*.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_committed_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["kernelspec"]["display_name"] == installed_display_name()
    checked = 0
    for cell in code_cells(nb):
        if CHECK in source(cell):
            # nbval reads the marker only on a line of its own.
            assert source(cell).startswith(CHECK + "\n"), f"{CHECK} must be the cell's first line, alone"
            # Committed with its text output only, which nbval compares.
            checked += 1
            assert cell["outputs"], f"a {CHECK} cell has no committed output"
            assert all(o["output_type"] == "stream" and o["name"] == "stdout" for o in cell["outputs"])
            assert cell.get("execution_count") == 1  # nbval skips the comparison for a cell that never ran
        else:
            assert not cell.get("outputs") and cell.get("execution_count") is None, "outputs not stripped"
    assert checked == CHECKED_CELLS.get(path.stem, 0), f"{checked} cells marked {CHECK}"
    params = [c for c in code_cells(nb) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert re.search(r"^smoke = False\b", source(params[0]), re.M), "parameters: a plain `smoke = False`"
    code = "".join(source(c) for c in code_cells(nb))
    # nbval cannot inject parameters: the tests set LONGCAT_LAB_SMOKE=1, read right after the parameters.
    assert 'smoke = smoke or os.environ.get("LONGCAT_LAB_SMOKE") == "1"' in code
    assert "import longcat_lab" in code or "from longcat_lab" in code


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_papermill_injects_smoke(path):
    """`longcat-lab notebooks --smoke` runs the notebooks with papermill: its smoke=True must come after the
    parameters cell's default, so both ways of asking for the fast version agree."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(path)), {"smoke": True})
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    at = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert "injected-parameters" in tags[at + 1] and "smoke = True" in nb.cells[at + 1].source


def test_git_filter_keeps_notebooks_clean(tmp_path):
    """tools/nbstrip.py (the git clean filter) leaves every committed notebook byte for byte as it is, and turns an
    executed copy with `smoke = True`, outputs, counts and widget state back into the committed file."""
    import subprocess
    import sys

    strip = [sys.executable, str(ROOT / "tools" / "nbstrip.py")]
    for path in NOTEBOOKS:
        committed = path.read_bytes()
        assert subprocess.run(strip, input=committed, capture_output=True, check=True).stdout == committed, path.name
        nb = json.loads(committed)
        nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
        for i, cell in enumerate(code_cells(nb)):
            if "parameters" in cell["metadata"].get("tags", []):
                cell["source"] = [re.sub(r"^smoke = False", "smoke = True", line) for line in cell["source"]]
            if CHECK not in source(cell):
                cell["execution_count"] = i + 7
                cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["ran\n"]}]
            cell["metadata"]["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00"}
        ran = json.dumps(nb, indent=1).encode()
        assert ran != committed
        assert subprocess.run(strip, input=ran, capture_output=True, check=True).stdout == committed, path.name
    assert subprocess.run(strip, input=b"not json", capture_output=True, check=True).stdout == b"not json"
    assert "filter=nbstrip" in (ROOT / ".gitattributes").read_text()
    assert "filter.nbstrip.clean" in (ROOT / "tools" / "env.sh").read_text()
