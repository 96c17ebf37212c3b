#!/usr/bin/env bash
# The README's third command: install into ./.venv (as main.sh and test.sh do), then serve JupyterLab on notebooks/
# with the project's kernel as the default. JupyterLab prints the URL to open (with its token). Arguments go to
# `jupyter lab`, e.g. `bash tools/lab.sh --no-browser --port 8890`.
source "$(dirname "$0")/env.sh"
echo "[longcat_lab] JupyterLab on notebooks/ (kernel: the python3 kernelspec in $venv); Ctrl-C stops it"
# Widget state saved with the notebook, so a notebook reopened without running it shows its controls as they were
# instead of "Error displaying widget: model not found" (the git filter keeps that state out of the commits).
# An overrides file is JupyterLab's default for every user of this venv; one already there is left alone.
overrides="$venv/share/jupyter/lab/settings/overrides.json"
if [ ! -e "$overrides" ]; then
    mkdir -p "$(dirname "$overrides")"
    echo '{"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": true}}' > "$overrides"
fi
# Containers often run as root, which jupyter refuses without --allow-root.
if [ "$(id -u)" = 0 ]; then set -- --allow-root "$@"; fi
exec jupyter lab --ServerApp.root_dir="$root/notebooks" --MultiKernelManager.default_kernel_name=python3 "$@"
