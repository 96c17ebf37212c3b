#!/usr/bin/env bash
# The README's main job: install into ./.venv, then run the real job on the built-in data.
source "$(dirname "$0")/env.sh"
exec longcat-lab train --preset small --out runs/small --resume "$@"
