"""config.py: config.yaml agrees with the Config dataclass, and every bad file, key or value stops with one line."""
import re
from pathlib import Path

import pytest

from distill import config

ROOT = Path(__file__).resolve().parents[1]
KEY_LINE = re.compile(r"^(\w+):\s*(.*?)\s+#\s(.*)$")  # key: value  # meaning


def yaml_key_lines():
    """(key, comment) for every `key: value  # comment` line of config.yaml, in file order."""
    lines = (ROOT / "config.yaml").read_text().splitlines()
    return [KEY_LINE.match(line).group(1, 3) for line in lines if line and not line.startswith("#")]


def test_config_yaml_and_dataclass_agree():
    """config.yaml has exactly the dataclass's keys in its order, each commented with the field's meaning, and loads."""
    found = yaml_key_lines()
    assert [name for name, _ in found] == list(config.FIELDS)
    for name, comment in found:
        assert comment == config.FIELDS[name].metadata["meaning"], name
    cfg = config.load_config([])
    assert isinstance(cfg, config.Config)


def error_line(capsys, argv):
    """load_config(argv) must stop with exit code 2 and exactly one stderr line; returns that line."""
    with pytest.raises(SystemExit) as stop:
        config.load_config(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("args, key", [
    (["--eps0=-0.1"], "eps0"),
    (["--temperature=-1"], "temperature"),
    (["--method=nope"], "method"),
    (["--compare=opd,nope"], "compare"),
    (["--seeds=0,x"], "seeds"),
    (["--compare=opd,trb,"], "compare"),
    (["--seed=-1"], "seed"),
    (["--out_dir="], "out_dir"),
    (["--lr=inf"], "lr"),
    (["--weight_decay=nan"], "weight_decay"),
    (["--batch_size=0"], "batch_size"),
    (["--micro_batch_size=-1"], "micro_batch_size"),
    (["--max_steps=ten"], "max_steps"),
    (["--resume=maybe"], "resume"),
    (["--dtype=float16"], "dtype"),
    (["--cache=paged"], "cache"),
    (["--compile=true"], "compile"),  # needs cache: static
    (["--engine=sglang"], "engine"),
    (["--engine=vllm", "--method=skd"], "engine"),  # the engine runs the blend's token rule only
    (["--vllm_gpu_memory_utilization=1.5"], "vllm_gpu_memory_utilization"),
    (["--learning_rate=0.1"], "learning_rate"),
    (["--student=/does/not/exist"], "student"),
    (["--teacher=./no_such_teacher"], "teacher"),
    (["--dataset=/no/such/data.jsonl"], "dataset"),
    (["--student=./tests"], "student"),  # a path that exists, but 'synthetic' teacher and dataset cannot pair with it
    (["--config=/no/such/config.yaml"], "config"),
    (["lr=0.1"], "--key=value"),
])
def test_bad_override_is_one_line_naming_the_key(capsys, args, key):
    """A bad key or value stops with one line that names the key."""
    assert key in error_line(capsys, args)


def test_bad_values_in_the_file_name_the_key(capsys, tmp_path):
    """config.yaml with a wrong type, an unknown key or a missing key is rejected with the key's name."""
    text = (ROOT / "config.yaml").read_text()
    for old, new, key in (("eps0: 0.02", "eps0: high", "eps0"), ("seed: 0", "seed: 0\nextra_key: 1", "extra_key"),
                          ("seed: 0 ", "# seed: 0 ", "seed")):
        assert old in text
        (tmp_path / "bad.yaml").write_text(text.replace(old, new, 1))
        assert key in error_line(capsys, [f"--config={tmp_path / 'bad.yaml'}"])


@pytest.mark.parametrize("content, expected", [
    ("method: trb\neps0: [0.02\nseed: 0\n", r"bad\.yaml: line \d+, column \d+: invalid YAML"),
    ("method: trb\n  eps0: 0.02\n", r"bad\.yaml: line 2, column 7: invalid YAML"),
    ("", r"bad\.yaml is empty"),
    ("# only a comment\n", r"bad\.yaml is empty"),
    ("- method: trb\n- eps0: 0.02\n", r"bad\.yaml must be a mapping .* not a YAML list"),
    ("just some words\n", r"bad\.yaml must be a mapping .* not a YAML str"),
])
def test_malformed_file_is_one_line_naming_file_and_position(capsys, tmp_path, content, expected):
    """A malformed, empty or non-mapping YAML file stops with one line naming the file (and the error's line and
    column, counted from 1)."""
    (tmp_path / "bad.yaml").write_text(content)
    line = error_line(capsys, [f"--config={tmp_path / 'bad.yaml'}"])
    assert line.startswith("error: config: ") and re.search(expected, line), line


def test_unreadable_file_is_one_line(capsys, tmp_path):
    """A folder or a file that is not UTF-8 text given as --config stops with one line naming it."""
    assert "is not a file" in error_line(capsys, [f"--config={tmp_path}"])
    (tmp_path / "binary.yaml").write_bytes(b"method: \xff\xfe trb\n")
    assert "binary.yaml is not UTF-8 text" in error_line(capsys, [f"--config={tmp_path / 'binary.yaml'}"])


def test_yaml_floats_without_a_dot_and_infinite_budget_load(tmp_path):
    """`lr: 1e-5` (a string to YAML 1.1) loads as the float 1e-5; eps0 may be inf (the pure teacher), other floats not."""
    text = (ROOT / "config.yaml").read_text().replace("lr: 0.0005", "lr: 1e-5", 1).replace("eps0: 0.02", "eps0: .inf", 1)
    (tmp_path / "ok.yaml").write_text(text)
    cfg = config.load_config([f"--config={tmp_path / 'ok.yaml'}"])
    assert cfg.lr == 1e-5 and cfg.eps0 == float("inf")


def test_help_lists_every_key(capsys):
    """--help prints every key with its type and meaning, and exits 0."""
    with pytest.raises(SystemExit) as stop:
        config.load_config(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name, f in config.FIELDS.items():
        assert f"--{name}=" in out and f.metadata["meaning"] in out


def test_synthetic_task_larger_than_its_problem_space_is_refused(capsys):
    """More synthetic problems than task_digits allows stops with one line naming train_size (it would never end)."""
    from distill import synthetic_task
    cfg = config.load_config(["--task_digits=1", "--train_size=80", "--eval_size=2"])  # 81 distinct problems
    with pytest.raises(SystemExit):
        synthetic_task.splits(cfg)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train_size" in lines[0] and "81" in lines[0], lines
