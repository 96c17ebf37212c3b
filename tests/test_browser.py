"""The notebooks in a real browser: JupyterLab on a free port with a token, driven through headless Chromium by
Python playwright (the system Chromium, never a downloaded one).

1. Each executed notebook of build/notebooks/ (nbval leaves them there; run without it, this test executes them
   with papermill first): every plotly figure renders with data, every widget output shows a view or its one-line
   note (never a raw repr or "Error displaying widget"), no output shows an error, the console logs no errors.
   No stderr block at all, and exactly as much rendered maths as the Markdown holds (so a dollar amount never turns
   into maths).
2. Notebooks 02 and 03 with a live kernel: run all cells. In 02 the loss curve on screen ends at the last step
   trained (a plot redrawn only in the saved file would stop at the first redraw). In 03 every control cell shows
   exactly one figure, which changes in place when its first control moves. Screenshots (each figure, and the live
   pages and controls) land in build/screenshots/.

Skips, with the reason in the summary, without Chromium (tools/test.sh installs it with apt-get when it can).
"""

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = ROOT / "build" / "notebooks"
SHOTS = ROOT / "build" / "screenshots"
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
LIVE = "03_expert_activation.ipynb"
CONTROLS = (LIVE, "06_experiments.ipynb")  # the notebooks with controls, each moved in a live kernel
TRAINING = "02_train_small.ipynb"
PLOTLY, WIDGET = "application/vnd.plotly.v1+json", "application/vnd.jupyter.widget-view+json"
# Chromium as root in a sandbox with no network: no sandbox, no GPU, and none of its background connections.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# JupyterLab user settings for the test server: every cell rendered (no virtual scrolling, so all outputs exist in
# the page), and no news or update checks (they would try the network).
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

pytestmark = pytest.mark.slow


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no system Chromium (tools/test.sh installs the chromium package when run as root with apt-get)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Maths in Markdown as JupyterLab finds it: $$...$$ or $...$ on one line, outside code spans.
MATH = re.compile(r"\$\$.+?\$\$|\$[^$\n]+?\$", re.S)


def math_spans(path: Path) -> int:
    cells = json.loads(path.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    return sum(len(MATH.findall(re.sub(r"`[^`]*`", "", s))) for s in sources)


def outputs(path: Path, mime: str) -> int:
    nb = json.loads(path.read_text())
    return sum(mime in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    exe = chromium()
    # Only the executed notebooks this session's tests open (`-k 02` runs one notebook, not all seven).
    params = [getattr(item, "callspec", None) for item in request.session.items]
    wanted = [p for p in SOURCES if any(c is not None and c.params.get("path") == p for c in params)]
    stale = [
        p for p in wanted if not (EXECUTED / p.name).exists() or (EXECUTED / p.name).stat().st_mtime < p.stat().st_mtime
    ]
    if stale:  # run alone: execute what nbval has not left behind
        from longcat_lab.cli.notebooks import run_notebooks

        run_notebooks(EXECUTED, smoke=True, only=[p.name[:2] for p in stale])
    root = tmp_path_factory.mktemp("lab")
    (root / "executed").mkdir()
    for p in wanted:
        shutil.copy(EXECUTED / p.name, root / "executed" / p.name)
    (root / "live").mkdir()
    for name in (*CONTROLS, TRAINING):
        shutil.copy(ROOT / "notebooks" / name, root / "live" / name)
    for name, value in SETTINGS.items():
        (root / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "settings" / name).write_text(json.dumps(value))
    port, token = free_port(), "longcat-lab-browser-test"
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "LONGCAT_LAB_SMOKE": "1",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", f"--IdentityProvider.token={token}"]
        + [f"--ServerApp.root_dir={root}", "--MultiKernelManager.default_kernel_name=python3", "--allow-root"]
        + ["--LabApp.extension_manager=readonly"],  # no PyPI look-ups
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(root / "server.log").open("w"),  # noqa: SIM115 (open as long as the server runs)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=FLAGS)
            yield dict(browser=browser, base=base, token=token, root=root)
            browser.close()
    finally:  # the server and its kernels go whatever happened: a lab left running holds a core
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def open_notebook(lab, path: str):
    """A page showing `path` (relative to the server's root), and the list its console errors are collected in."""
    page = lab["browser"].new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{lab['base']}/lab/tree/{path}?token={lab['token']}&reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()  # fold the file browser away
    return page, errors


# A rendered figure: plotly.js has drawn it and it holds traces, or shapes and annotations (the diagrams of 01).
PLOTS_WITH_DATA = (
    "[...document.querySelectorAll('.jp-Notebook .js-plotly-plot')].filter(e => e.querySelector('.main-svg')"
    " && e.data && e.layout && (e.data.length || (e.layout.shapes || []).length"
    " || (e.layout.annotations || []).length))"
)


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_executed_notebook_renders(lab, path):
    page, errors = open_notebook(lab, f"executed/{path.name}")
    executed = EXECUTED / path.name
    figures, widget_outputs = outputs(executed, PLOTLY), outputs(executed, WIDGET)
    page.wait_for_function(f"{PLOTS_WITH_DATA}.length >= {figures}", timeout=60_000)
    assert page.evaluate(f"{PLOTS_WITH_DATA}.length") == page.locator(".jp-Notebook .js-plotly-plot").count()
    assert page.locator(".jp-Notebook .js-plotly-plot").count() == figures
    text = page.locator(".jp-Notebook").inner_text()
    # A widget whose state was not saved shows its text/plain: our note, never `VBox(children=...)`.
    # (nbval ignores display updates, so a live training figure stays a widget there, with its note.)
    notes = text.count("open this notebook with a running kernel") + text.count("a live figure while training ran")
    assert notes == widget_outputs
    assert "VBox(children" not in text and "Error displaying widget" not in text
    assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count() == 0
    stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert not stderr, stderr  # red blocks read as failures to a student: warnings and logs are captured or fixed
    maths = math_spans(path)
    if maths:
        page.wait_for_function(f"document.querySelectorAll('.jp-MarkdownCell mjx-container').length >= {maths}")
    else:
        page.wait_for_timeout(500)  # time for MathJax to typeset anything it would find
    assert page.locator(".jp-MarkdownCell mjx-container").count() == maths, "maths where the source has none"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{path.stem}.png")
    for i, fig in enumerate(page.locator(".jp-Notebook .js-plotly-plot").all()):
        fig.screenshot(path=SHOTS / f"{path.stem}_fig{i:02d}.png")
    assert not errors, errors
    page.close()


def figure_state(cell) -> str:
    """The title and data of the first plotly figure in a cell, as JSON."""
    return cell.locator(".js-plotly-plot").first.evaluate("e => JSON.stringify([e.layout.title, e.data])")


def wait_changed(page, cell, before: str) -> None:
    """Wait until the cell's figure differs from `before` (a `figure_state`). While the control swaps the old
    figure for the new one there is a moment with no plotted figure in the cell: keep waiting through it."""
    js = (
        "([c, b]) => { const e = c.querySelector('.js-plotly-plot');"
        " return !!e && !!e.layout && JSON.stringify([e.layout.title, e.data]) !== b; }"
    )
    page.wait_for_function(js, arg=[cell.element_handle(), before], timeout=30_000)


def settle(page, cell, n: int) -> None:
    """Give a redraw up to 10 s to leave `n` figures in the cell. With two boxes of controls in one cell,
    `wait_changed` can see the other box's figure while the moved one is being swapped, and return mid-swap; the
    caller then asserts the count (a duplicate figure stays, and fails it)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    js = "([c, n]) => c.querySelectorAll('.js-plotly-plot').length === n"
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(js, arg=[cell.element_handle(), n], timeout=10_000)


def run_live(lab, name: str, timeout_ms: int):
    """A page with notebook `name` of live/, all its cells run in a kernel, and its console errors."""
    page, errors = open_notebook(lab, f"live/{name}")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    # JupyterLab rewrites the kernelspec and language_info it finds different from the running kernel's; the
    # notebooks are saved with this project's (Python's version included, so only that version opens them clean).
    committed = json.loads((ROOT / "notebooks" / name).read_text())["metadata"]["language_info"]["version"]
    if committed == platform.python_version() and name in CONTROLS:
        assert page.locator(".lm-TabBar-tab.jp-mod-dirty").count() == 0, "the committed notebook opened modified"
    page.locator(".lm-MenuBar-item", has_text="Run").click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
    done = "[...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].every(p => /\\[\\d+\\]/.test(p.textContent))"
    page.wait_for_function(done, timeout=timeout_ms)
    assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count() == 0
    text = page.locator(".jp-Notebook").inner_text()
    assert "Error displaying widget" not in text and "alert:" not in text
    return page, errors


def test_live_training_plot_reaches_last_step(lab):
    # The smoke run trains for 150 steps: a couple of minutes on a quiet machine, many more on a loaded one.
    page, errors = run_live(lab, TRAINING, timeout_ms=1_800_000)
    printed = re.search(r"(\d+) steps, [\d,]+ tokens; final checkpoint", page.locator(".jp-Notebook").inner_text())
    assert printed, "notebook 02 printed no 'N steps, M tokens' line"
    loss = (
        "[...document.querySelectorAll('.jp-Notebook .js-plotly-plot')]"
        ".filter(e => e.layout && /validation loss/.test((e.layout.title || {}).text || ''))"
    )
    assert page.evaluate(f"{loss}.length") == 1, "the loss curve is drawn more than once (or not at all)"
    last_x = page.evaluate(f"{loss}[0].data[0].x.slice(-1)[0]")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / "live_02.png", full_page=True)
    assert last_x == int(printed.group(1)), f"the loss curve on screen stops at step {last_x}"
    assert not errors, errors
    page.close()


@pytest.mark.parametrize("name", CONTROLS, ids=[n[:2] for n in CONTROLS])
def test_live_controls_redraw_in_place(lab, name):
    page, errors = run_live(lab, name, timeout_ms=240_000)
    # Every dropdown shows its default (a Dropdown whose value is None shows a blank box).
    selects = page.locator(".jp-Notebook .widget-dropdown select")
    assert selects.count() >= 1 and all(i >= 0 for i in selects.evaluate_all("s => s.map(e => e.selectedIndex)"))
    controls = page.locator(".jp-CodeCell").filter(has=page.locator(".widget-dropdown, .widget-slider"))
    assert controls.count() >= (3 if name == LIVE else 1)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for i, cell in enumerate(controls.all()):  # one figure per control cell, and the first control moves it
        cell.scroll_into_view_if_needed()
        boxes = cell.locator(".widget-vbox").count()  # one box of controls per figure_controls call
        assert cell.locator(".js-plotly-plot").count() == boxes, f"control cell {i}: not one figure per control box"
        before = figure_state(cell)
        control = cell.locator(".widget-dropdown select, .widget-slider").first
        if control.evaluate("e => e.tagName") == "SELECT":
            control.select_option(index=0 if control.evaluate("e => e.selectedIndex") else 1)  # another option
        else:
            cell.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle").first.focus()
            page.keyboard.press("ArrowRight")
        wait_changed(page, cell, before)
        settle(page, cell, boxes)
        assert cell.locator(".js-plotly-plot").count() == boxes, f"a change in control cell {i} left a second figure"
        cell.screenshot(path=SHOTS / f"live_{name[:2]}_controls{i}.png")
    if name != LIVE:
        assert not errors, errors
        return page.close()
    # The token map's sample slider: one step moves the figure to the next sample.
    cell = controls.first
    after_dropdown = figure_state(cell)
    cell.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle").first.focus()
    page.keyboard.press("ArrowRight")
    wait_changed(page, cell, after_dropdown)
    assert "sample 1" in figure_state(cell)
    assert not errors, errors
    page.close()
