#!/usr/bin/env bash
# Quick start on a machine with only python3: sets up .venv from requirements.txt and requirements-dev.txt (the
# optional metric trackers the tests read back) on first use, then runs
#     ./run.sh                  # the main job: python train_small.py (any --key=value is passed on)
#     ./run.sh test             # the test suite: python -m pytest -q tests (what .ci/run calls), then the vLLM
#                               # engine's tests in .venv-vllm (TRB_VLLM_TESTS=0 skips them)
# With --engine=vllm the main job runs in .venv-vllm, the vLLM engine's environment (vLLM brings its own
# transformers): requirements-vllm-cuda.txt where `nvidia-smi` lists a GPU, else requirements-vllm.txt (vLLM's CPU
# build); TRB_VLLM_BUILD=cuda or cpu chooses, and `./run.sh vllm-requirements` prints the choice. Each setup is
# skipped while its venv's requirements.sha256 matches its requirements files, and redone (the venv recreated from
# empty, so that the CPU and CUDA builds never meet) when one changes or an earlier setup was interrupted. PYTHON
# picks the interpreter that creates the venvs (default python3).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

setup() {  # setup VENV REQUIREMENTS...: create VENV from the requirements files unless it is up to date
    local venv=$1 want files
    shift
    files="$*"
    want=$("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest())' "$@")
    if [ "$(cat "$venv/requirements.sha256" 2>/dev/null)" != "$want" ]; then
        echo "setting up $venv (python -m venv, pip install -r ${files// / -r }; once)" >&2
        "$PYTHON" -m venv --clear "$venv" || { echo "error: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
        "$venv/bin/python" -m pip install -q $(printf -- '-r %s ' "$@")
        if [ "$1" = requirements-vllm.txt ]; then
            # vLLM's CPU build pulls torchvision, torchaudio and torchcodec built for another torch; they break
            # `from transformers import Qwen3ForCausalLM`, and text models need none of them.
            "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null
        fi
        echo "$want" > "$venv/requirements.sha256"  # written last: an interrupted install is redone next time
    fi
}

vllm_requirements() {  # the vLLM environment's requirements file: the CUDA build where a GPU answers
    case "${TRB_VLLM_BUILD:-auto}" in
        cuda) echo requirements-vllm-cuda.txt ;;
        cpu) echo requirements-vllm.txt ;;
        auto) if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then echo requirements-vllm-cuda.txt
              else echo requirements-vllm.txt; fi ;;
        *) echo "error: TRB_VLLM_BUILD must be cuda, cpu or auto, got '$TRB_VLLM_BUILD'" >&2; exit 2 ;;
    esac
}

if [ "${1:-}" = vllm-requirements ]; then
    vllm_requirements
    exit 0
fi
setup .venv requirements.txt requirements-dev.txt
export TRB_LAUNCH=./run.sh  # the command that train_small.py's summary suggests next starts with this
if [ "${1:-}" = test ]; then
    shift
    status=0
    .venv/bin/python -m pytest -q tests "$@" || status=$?
    if [ "${TRB_VLLM_TESTS:-1}" != 0 ]; then
        requirements=$(vllm_requirements)
        setup .venv-vllm "$requirements"
        VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} .venv-vllm/bin/python -m pytest -q -p no:cacheprovider \
            tests/test_vllm_engine.py "$@" || { rc=$?; [ $rc = 5 ] || status=$rc; }  # 5: none selected (-m fast)
    fi
    exit $status
fi
for arg in "$@"; do
    if [ "$arg" = --engine=vllm ]; then
        requirements=$(vllm_requirements)
        setup .venv-vllm "$requirements"
        exec .venv-vllm/bin/python train_small.py "$@"
    fi
done
exec .venv/bin/python train_small.py "$@"
