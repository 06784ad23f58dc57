#!/usr/bin/env bash
# Refreshes the lock files from pyproject.toml (what `make lock` runs):
#   requirements.lock       the service's dependencies (the Docker image installs it)
#   requirements-test.lock  the same plus the "test" extra (CI, reproducible test runs)
# Universal resolution for Python >= 3.11 on every platform, with sha256
# hashes, so `pip install --require-hashes -r requirements.lock` works on the
# python:3.12-slim image as on a developer's 3.11.
# Usage: deploy/tools/lock.sh [--upgrade]   (default: keep current pins where possible)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/uv" ]; then
    "$venv/bin/python" -m pip install --quiet 'uv>=0.5'
fi

common=(--universal --python-version 3.11 --generate-hashes --quiet
        --custom-compile-command "make lock" "$@")
"$venv/bin/uv" pip compile pyproject.toml "${common[@]}" -o requirements.lock
"$venv/bin/uv" pip compile pyproject.toml --extra test "${common[@]}" -o requirements-test.lock
