#!/bin/sh
# Runs `selfref` for the dvc.yaml stages, so `dvc repro` works with or without an activated environment:
# the `selfref` on PATH if there is one, else the project's .venv (made by `make install`).
if command -v selfref >/dev/null 2>&1; then exec selfref "$@"; fi
venv="$(dirname "$0")/../.venv/bin/selfref"
if [ -x "$venv" ]; then exec "$venv" "$@"; fi
echo "error: selfref is not installed: run \`make install\` in the project root (or activate the environment that has it)" >&2
exit 127
