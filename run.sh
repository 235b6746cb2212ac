#!/usr/bin/env bash
# Quick start on a machine with only python3: sets up .venv from requirements.txt and requirements-dev.txt (the
# optional metric trackers the tests read back) on first use, then runs
#     ./run.sh                  # the main job: python train_small.py (any --key=value is passed on)
#     ./run.sh test             # the test suite: python -m pytest -q tests (what .ci/run calls)
# Setup is skipped while .venv/requirements.sha256 matches the two files, and redone when either changes or an
# earlier setup was interrupted. PYTHON picks the interpreter that creates the venv (default python3).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
want=$("$PYTHON" -c 'import hashlib; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in ("requirements.txt", "requirements-dev.txt"))).hexdigest())')
if [ "$(cat .venv/requirements.sha256 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv (python -m venv, pip install -r requirements.txt -r requirements-dev.txt; once)" >&2
    "$PYTHON" -m venv .venv || { echo "error: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
    .venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
    echo "$want" > .venv/requirements.sha256  # written last: an interrupted install is redone next time
fi
export TRB_LAUNCH=./run.sh  # the command that train_small.py's summary suggests next starts with this
if [ "${1:-}" = test ]; then
    shift
    exec .venv/bin/python -m pytest -q tests "$@"
fi
exec .venv/bin/python train_small.py "$@"
