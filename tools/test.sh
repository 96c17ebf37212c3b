#!/usr/bin/env bash
# The README's test command: install into ./.venv, then run the whole suite (notebooks included, via papermill).
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k router`.
source "$(dirname "$0")/env.sh"
exec python -m pytest "$@"
