"""Tests of the explanatory figures of notebook 01. Run: `bash tools/test.sh tests/viz/test_diagrams.py`."""

import pytest

from longcat_lab.model import presets
from longcat_lab.viz import diagrams


@pytest.mark.parametrize("style,source", [("scmoe", "N_post0 → u"), ("vanilla", "N_post1 → v")])
def test_dataflow_draws_every_block_and_the_moe_branch(style, source):
    fig = diagrams.layer_dataflow(style)
    labels = [a.text for a in fig.layout.annotations if a.text]
    assert {"MLA_0", "MLA_1", "FFN_0", "FFN_1", "+ y", source} <= set(labels)
    assert len(fig.layout.shapes) == 14  # 13 spine boxes + the MoE
    red = [a for a in fig.layout.annotations if a.arrowcolor == "#cc0000"]
    assert len(red) == 2  # into the MoE, and from it to the last addition


def test_dataflow_rejects_unknown_style():
    with pytest.raises(ValueError, match="style='dense'"):
        diagrams.layer_dataflow("dense")


def test_param_table_rows():
    fig = diagrams.param_table({"tiny": presets.tiny(), "released": presets.released()})
    cells = fig.data[0].cells.values
    assert list(cells[0]) == ["tiny", "released"]
    assert cells[3][1] == "18.69B" and cells[5][1] == "31.38B"  # activated min / max of the release
