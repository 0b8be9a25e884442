#!/usr/bin/env bash
# Sets the machine up for the pipeline and its tests: the Debian packages they need when missing
# (ffmpeg, espeak-ng; chromium and a Telugu font for the demo page test; prometheus for promtool;
# PostgreSQL for the scaling tests; haproxy for the serving pool), then the virtual
# environment (.venv) with the pinned packages. Quick the second time: apt is
# skipped when the tools are there, and pip reuses its cache (~/.cache/pip) and the installed venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ffmpeg >/dev/null || need_apt+=(ffmpeg)
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v chromium >/dev/null || need_apt+=(chromium)
# the balancer in front of `s2s serve` replicas (s2s serve-pool, tests/test_serve_pool.py)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
# Telugu glyphs for the demo page's labels (tests/test_demo_page.py screenshots it)
dpkg -s fonts-noto-core >/dev/null 2>&1 || need_apt+=(fonts-noto-core)
# promtool, to test the alerting rules in monitoring/ (tests/test_alerts.py)
command -v promtool >/dev/null || need_apt+=(prometheus)
# PostgreSQL: the team-scale tests' MLflow and Prefect servers keep their state in it (docs/scaling.md)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
echo "setup: installing the project and its pinned dependencies (first time: a few minutes, torch is large)"
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
git config --global --add safe.directory "$(pwd)" 2>/dev/null || true
echo "setup: done"
