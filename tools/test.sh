#!/usr/bin/env bash
# The README's test command: install into ./.venv, check lint and formatting (ruff), then run the whole suite
# (notebooks included, via papermill). Extra arguments go to pytest, e.g. `bash tools/test.sh -k router`.
source "$(dirname "$0")/env.sh"
echo "[longcat_lab] ruff check and ruff format --check"
ruff check --quiet .
ruff format --check --quiet .
exec python -m pytest "$@"
