#!/usr/bin/env bash
# The README's test command: install into ./.venv, check lint and formatting (ruff), then run the whole suite: the
# notebooks under nbval (every cell executed in its fast `smoke` version, the cells marked NBVAL_CHECK_OUTPUT compared
# with their committed outputs, executed copies saved in build/notebooks/), then tests/, the browser tests included.
# Extra arguments go to pytest instead of the default paths, e.g. `bash tools/test.sh -k router` (tests/ only) or
# `bash tools/test.sh notebooks/03_expert_activation.ipynb`.
source "$(dirname "$0")/env.sh"
echo "[longcat_lab] ruff check and ruff format --check"
ruff check --quiet .
ruff format --check --quiet .
# The browser tests drive the system Chromium (never a downloaded one); install it when we can, else they skip.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[longcat_lab] installing Chromium for the browser tests (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
        echo "[longcat_lab] could not install Chromium: the browser tests will skip"
fi
export LONGCAT_LAB_SMOKE=1
# Hypothesis replays the same derandomized examples on every run (tests/conftest.py); random fuzzing: tools/fuzz.sh.
export HYPOTHESIS_PROFILE=deterministic
# Notebooks first: the browser test opens the copies they leave in build/notebooks/.
if [ $# -eq 0 ]; then set -- notebooks tests; fi
exec python -m pytest --nbval-lax "$@"
