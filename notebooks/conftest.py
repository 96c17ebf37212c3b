"""pytest plugin for `pytest --nbval-lax notebooks`: saves every notebook nbval ran, with the outputs it produced,
into build/notebooks/ (ignored by git), so the browser test and a reader open exactly what the tests executed
instead of running each notebook a second time. Set LONGCAT_LAB_SMOKE=1 (tools/test.sh does) for the fast version.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest

from longcat_lab._util import atomic_write_bytes

OUT = Path(__file__).resolve().parent.parent / "build" / "notebooks"
_ran: dict[str, tuple] = {}  # notebook path -> (notebook as read by nbval, {id(cell): outputs})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    nb = getattr(item.parent, "nb", None)
    outputs = getattr(item, "test_outputs", None)
    if nb is None or outputs is None:
        return
    _, cells = _ran.setdefault(str(item.parent.path), (nb, {}))
    cells[id(item.cell)] = outputs
    # Written after every cell, so the copy is current for the tests that run after this notebook in the session.
    save(Path(item.parent.path).name, nb, cells)


def save(name: str, nb, cells: dict) -> None:
    done = copy.deepcopy(nb)
    count = 0
    for cell, ran in zip(nb.cells, done.cells):
        if id(cell) not in cells:
            continue
        count += 1
        ran.outputs = [nbformat.from_dict(o) for o in cells[id(cell)]]
        ran.execution_count = count
        for o in ran.outputs:
            if o.get("output_type") == "execute_result":
                o["execution_count"] = count
    atomic_write_bytes(OUT / name, nbformat.writes(done).encode())
