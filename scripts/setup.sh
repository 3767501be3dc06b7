#!/usr/bin/env bash
# Fresh-machine setup for the standalone CLI and the test suite: a virtual environment in .venv
# with torch 2.13.0 (CPU wheel unless one is already cached), the pack's requirements and the
# test tools. Debian's espeak-ng and sox give the tests real speech (installed when root).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! { command -v espeak-ng && command -v sox; } >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox >/dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt \
  -r requirements.txt -r requirements-test.txt
.venv/bin/python -c "import torch, diffusers, transformers, av, soxr; print('setup ok: torch', torch.__version__)"
# Prove the install: tiny random models through the whole chain to a short mp4 with audio.
.venv/bin/python -m sonic_core selftest
