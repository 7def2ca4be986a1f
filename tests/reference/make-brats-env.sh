#!/usr/bin/env bash
# Creates .venv-brats: a separate environment with the BraTS challenge's own metric package,
# for the optional cross-check tests/unit/test_brats_reference.py.
#
# Why a separate environment: brats-evaluation is AGPL-3.0 and pins numpy<2.3 and rich<14,
# which would downgrade fedseg's stack (flwr); it must never be one of fedseg's dependencies.
# The test only runs tests/reference/brats_runner.py with this interpreter, in a subprocess.
#
# Usage (from anywhere):  bash tests/reference/make-brats-env.sh [VENV_DIR]
# The versions are pinned because the test documents their exact behaviour; override with
# BRATS_EVALUATION_SPEC / PANOPTICA_SPEC to try others.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$root/.venv-brats}"
python="${PYTHON:-python3.11}"
brats_spec="${BRATS_EVALUATION_SPEC:-brats-evaluation==0.0.10}"
panoptica_spec="${PANOPTICA_SPEC:-panoptica==2.1.7}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$brats_spec" "$panoptica_spec"
"$venv/bin/python" -c "import brats_evaluation, panoptica; print('brats-evaluation ready')"
echo "created $venv; the test finds it there, or set FEDSEG_BRATS_PYTHON=$venv/bin/python"
