"""
Every command the README, the docs pages and the scripts' docstrings show is one a user can type: the training
commands' --key=value arguments load as a config (their presets and suites exist), each script's flags are ones its
--help lists, the files they name exist. The commands themselves run in tiny form elsewhere (test_train_small,
test_fsdp, test_evaluate, test_prepare_data, test_plot_strengths, test_bench, test_memory_plan, test_gpu_check).
"""
import ast
import contextlib
import functools
import importlib
import inspect
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from distill import config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py") if p.stem != "__init__")


def markdown_commands(path):
    """The command lines of a markdown file's ```bash blocks, continuations joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        commands += joined(block.splitlines())
    return commands


def docstring_commands(path):
    """The command lines in a Python file's module docstring (indented lines that start a command)."""
    lines = [line.strip() for line in (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()]
    return [c for c in joined(lines) if c.startswith(("python ", "torchrun ", "./run.sh"))]


def joined(lines):
    out, current = [], ""
    for line in lines:
        current += " " + line.strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        command = strip_comment(current).strip()
        if command:
            out.append(command)
        current = ""
    return out


def strip_comment(line):
    """The line up to an unquoted ` #`."""
    match = re.search(r"(^|\s)#", line)
    return line[:match.start()] if match else line


def all_commands():
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "train_small.py",
               ROOT / "train_fsdp.py", *sorted((ROOT / "scripts").glob("*.py"))]
    found = []
    for path in sources:
        commands = markdown_commands(path) if path.suffix == ".md" else docstring_commands(path)
        found += [(path.relative_to(ROOT), c) for c in commands]
    return found


def training_args(words):
    """The train_small.py / train_fsdp.py arguments of a command, or None if it runs neither."""
    for i, word in enumerate(words):
        if word in ("train_small.py", "train_fsdp.py"):
            return words[i + 1:]
    if words[:1] == ["./run.sh"] and words[1:2] not in (["test"], ["vllm-requirements"]):
        return words[1:]
    return None


def script_of(words):
    """(script name, its arguments) of a `python -m scripts.NAME` command, or None."""
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1].startswith("scripts."):
            return words[i + 1].removeprefix("scripts."), words[i + 2:]
    return None


@functools.lru_cache(maxsize=None)
def script_help(name):
    """What `python -m scripts.NAME --help` prints, from the script's main() in this process (no new interpreter)."""
    module = importlib.import_module(f"scripts.{name}")
    shown, argv = io.StringIO(), sys.argv
    sys.argv = [f"scripts/{name}.py", "--help"]  # main() reads sys.argv where it takes no argv
    try:
        with contextlib.redirect_stdout(shown), pytest.raises(SystemExit) as stop:
            module.main(*(["--help"],) if inspect.signature(module.main).parameters else ())
    finally:
        sys.argv = argv
    assert stop.value.code in (0, None), name
    return shown.getvalue()


def words_of(command):
    """The command's words as the shell splits them (a placeholder such as <OPD's pick> split at spaces)."""
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def placeholder(value):
    return any(mark in value for mark in ("...", "$", "<", "PATH", "DIR"))


def test_the_docs_show_commands_of_every_kind():
    """The README alone shows the quick start, training, torchrun, and at least four of the scripts' commands."""
    commands = [c for path, c in all_commands() if str(path) == "README.md"]
    assert "./run.sh" in commands and "./run.sh test" in commands
    assert any(c.startswith("torchrun") for c in commands) and any("train_small.py" in c for c in commands)
    assert len({script_of(words_of(c))[0] for c in commands if script_of(words_of(c))}) >= 4


@pytest.mark.parametrize("where, command", all_commands(), ids=lambda x: str(x)[:80])
def test_each_shown_command_has_valid_arguments(where, command, capsys):
    """A training command's arguments load as a config (keys, values, preset files); a script's flags are among its
    --help's; a file a command reads from the repository exists."""
    words = [w for w in words_of(command) if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # environment assignments aside
    for word in words:
        if word.startswith(("configs/", "docs/", "requirements")) or "=configs/" in word:
            path = word.split("=", 1)[-1] if word.startswith("--") else word
            assert placeholder(path) or (ROOT / path).exists(), f"{where}: {command}: no {path}"
    args = training_args(words)
    if args is not None:
        # train_fsdp.py --plan also takes the memory plan's --world_size and --gpu_gib
        plan_options = ("--plan", "--world_size", "--gpu_gib") if "--plan" in args else ()
        flags = [a for a in args if a.startswith("--") and a.split("=", 1)[0] not in plan_options]
        for flag in flags:
            name = flag[2:].split("=", 1)[0]
            assert name in config.FIELDS or name in ("config", "help"), f"{where}: {command}: unknown --{name}"
        if not any(placeholder(a) for a in args) and "--help" not in args:
            try:
                config.load_config(flags)
            except SystemExit:
                pytest.fail(f"{where}: {command}: {capsys.readouterr().err.strip()}")
    script = script_of(words)
    if script is not None:
        name, script_args = script
        assert name in SCRIPTS, f"{where}: {command}: no scripts/{name}.py"
        shown = script_help(name)
        for arg in script_args:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                assert re.search(re.escape(flag) + r"\b", shown), f"{where}: {command}: {flag} not in its --help"
