"""The package's shape, checked: optional dependencies stay in their folders, files stay small, comments cite what is
in the repo, and nothing executes text. Also: `import longcat_lab` and a CLI training run work without plotly.

Run: `bash tools/test.sh tests/test_package.py`.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "longcat_lab"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# Where each optional dependency may be imported (a path prefix inside the package).
OPTIONAL_HOMES = {
    "plotly": ("viz/",),
    "ipywidgets": ("viz/",),
    "transformers": ("export/",),
    "papermill": ("cli/",),
    "fastapi": ("serve/",),
    "uvicorn": ("serve/",),
}
MAX_FILE_LINES = 500


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_sources_found():
    assert len(SOURCES) > 20, SOURCES


@pytest.mark.parametrize("dependency", sorted(OPTIONAL_HOMES))
def test_optional_dependencies_stay_home(dependency):
    homes = OPTIONAL_HOMES[dependency]
    offenders = [
        rel(p)
        for p in SOURCES
        if dependency in imported_roots(ast.parse(p.read_text())) and not rel(p).startswith(homes)
    ]
    assert not offenders, f"{dependency} is imported outside {homes}: {offenders}"


def test_files_are_small():
    long = {rel(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_code_is_executed_from_text():
    """Model text is never executed: no eval/exec/compile builtins anywhere in the package."""
    calls = [
        (rel(p), node.lineno)
        for p in SOURCES
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("eval", "exec", "compile")
    ]
    assert not calls, calls


TEXT_FILES = (
    SOURCES
    + sorted((ROOT / "tests").rglob("*.py"))
    + sorted((ROOT / "benchmarks").glob("*.py"))
    + sorted((ROOT / "notebooks").glob("*.ipynb"))
    + sorted((ROOT / "docs").glob("*.md"))
    + [ROOT / "README.md"]
)
# A reference to a folder outside the repo, an issue number, or a design section that is not there.
OUTSIDE = re.compile(r"\.\./shared|shared/spec|spec section|\bissue \d|\bissue #\d")


def test_no_references_outside_the_repo():
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in TEXT_FILES
        if p != Path(__file__)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, hits


def test_design_citations_exist():
    """Every `docs/design.md §N` cited in code names a heading of docs/design.md."""
    design = (ROOT / "docs" / "design.md").read_text()
    headings = set(re.findall(r"^#+ (§?\d+(?:\.\d+)*)[ .]", design, flags=re.M))
    headings = {h.lstrip("§") for h in headings}
    cited = {
        (str(p.relative_to(ROOT)), m)
        for p in TEXT_FILES
        for m in re.findall(r"design\.md §(\d+(?:\.\d+)*)", p.read_text())
    }
    missing = sorted((path, n) for path, n in cited if n.rstrip(".") not in headings)
    assert not missing, f"cited sections missing from docs/design.md: {missing}"


# Without the notebooks extra --------------------------------------------------------------------------------------
BLOCK_PLOTLY = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("plotly", "ipywidgets", "papermill"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Block())
"""


def run_without_plotly(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_PLOTLY + code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def test_import_without_plotly(tmp_path):
    proc = run_without_plotly(
        "import longcat_lab, longcat_lab.model, longcat_lab.train, longcat_lab.data, "
        "longcat_lab.export, longcat_lab.parallel, longcat_lab.perf, longcat_lab.inference, "
        "longcat_lab.cli\nprint('ok')",
        tmp_path,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_cli_training_without_plotly(tmp_path):
    proc = run_without_plotly(
        "from longcat_lab.cli import main\n"
        f"raise SystemExit(main(['train', '--preset', 'tiny', '--steps', '3', '--samples', '0', '--no-progress', "
        f"'--out', {str(tmp_path / 'run')!r}]))",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


# The code map in docs/design.md §10 ---------------------------------------------------------------------------------
def code_map_rows() -> list[tuple[list[str], list[str]]]:
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## 10 Code map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            paths = re.findall(r"`([\w/.]+)`", cells[1])
            names = [n for n in re.findall(r"`([^`]+)`", cells[2]) if re.fullmatch(r"[A-Za-z_][\w.]*", n)]
            rows.append((paths, names))
    return rows


def test_code_map_names_exist():
    """Every module the code map names exists, and every name it lists is found in one of the row's modules, so the
    map cannot drift from the code."""
    import importlib

    rows = code_map_rows()
    assert len(rows) > 20, rows
    missing = []
    for paths, names in rows:
        modules = []
        for path in paths:
            full = ROOT / path if path.startswith("longcat_lab") else PACKAGE / path
            if not full.exists():
                missing.append(f"path {path}")
                continue
            dotted = full.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
            modules.append(importlib.import_module(dotted.removesuffix(".__init__")))
        for name in names:

            def found(module, name=name) -> bool:
                obj = module
                for part in name.split("."):
                    if not hasattr(obj, part):
                        return False
                    obj = getattr(obj, part)
                return True

            if not any(found(m) for m in modules):
                missing.append(f"{name} (in {paths})")
    assert not missing, missing
