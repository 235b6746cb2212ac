"""config.py: config.yaml agrees with the Config dataclass, and every bad file, key or value stops with one line."""
import json
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
    (["--compare=opd,opd"], "compare"),  # an arm twice
    (["--compare=opd,trb:eps0"], "compare"),  # an override without a value
    (["--compare=opd,trb:nope=1"], "compare"),  # an unknown key
    (["--compare=opd,trb:seed=3"], "compare"),  # a key an arm may not change
    (["--compare=opd,trb:eps0=-1"], "compare"),  # a value out of range
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
    (["--student=tests/no_such_student"], "student: no such folder or file"),  # its first folder exists: a path
    (["lr=0.1"], "--key=value"),
])
def test_bad_override_is_one_line_naming_the_key(capsys, args, key):
    """A bad key or value stops with one line that names the key."""
    assert key in error_line(capsys, args)


def test_bad_values_in_the_file_name_the_key(capsys, tmp_path):
    """A config file with a wrong type, an unknown key (the nearest known one suggested) or a key given twice is
    rejected with one line naming the key (and, for the repeated key, its second line)."""
    for content, expected in (("eps0: high\n", "eps0: expected float"),
                              ("seed: 0\nextra_key: 1\n", "extra_key: unknown config key (--help lists every key)"),
                              ("max_step: 4\n", "max_step: unknown config key (did you mean max_steps?)"),
                              ("lr: 0.001\nseed: 1\nlr: 0.002\n", "line 3: key 'lr' is given twice")):
        (tmp_path / "bad.yaml").write_text(content)
        line = error_line(capsys, [f"--config={tmp_path / 'bad.yaml'}"])
        assert expected in line, line
    assert "--lr_warmup: unknown config key (did you mean lr_warmup_steps?)" in error_line(capsys, ["--lr_warmup=3"])


def test_a_config_file_holds_only_what_it_changes(tmp_path):
    """A one-key file runs: every other key keeps config.yaml's default, and --key=value still overrides the file."""
    (tmp_path / "short.yaml").write_text("max_steps: 4  # a quick look\n")
    defaults = config.load_config([])
    cfg = config.load_config([f"--config={tmp_path / 'short.yaml'}"])
    assert cfg == config.Config(**{**vars(defaults), "max_steps": 4})
    assert config.load_config([f"--config={tmp_path / 'short.yaml'}", "--max_steps=7"]).max_steps == 7


@pytest.mark.parametrize("preset", ["gsm8k_1gpu", "qwen3_0.6b_from_4b", "qwen3_1.7b_from_8b"])
def test_each_preset_equals_its_full_copy(preset):
    """A preset holds only its differences to config.yaml; read on top of it, every key has the value the preset's
    full copy held (tests/preset_values.json: the presets' every key, written out)."""
    full = json.loads((ROOT / "tests" / "preset_values.json").read_text())[preset]
    cfg = config.load_config([f"--config={ROOT / 'configs' / f'{preset}.yaml'}"])
    assert set(full) == set(config.FIELDS)
    for name, value in full.items():
        assert config.checked(name, value) == getattr(cfg, name), name
    assert len((ROOT / "configs" / f"{preset}.yaml").read_text().splitlines()) < 45  # differences only


def test_a_real_model_needs_its_own_lr_and_length(capsys, tmp_path):
    """Real models with config.yaml's embedded-task lr and max_new_tokens stop with a pointer to the presets; a file
    that sets both loads."""
    for name in ("s", "t"):
        (tmp_path / name).mkdir()
    (tmp_path / "d.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    models = [f"--student={tmp_path / 's'}", f"--teacher={tmp_path / 't'}", f"--dataset={tmp_path / 'd.jsonl'}"]
    line = error_line(capsys, models)
    assert "lr, max_new_tokens are config.yaml's values for the embedded task" in line and "configs/" in line
    (tmp_path / "mine.yaml").write_text("lr: 1.0e-5\nmax_new_tokens: 1024\n")
    assert config.load_config([*models, f"--config={tmp_path / 'mine.yaml'}"]).lr == 1e-5


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
    (tmp_path / "ok.yaml").write_text("lr: 1e-5\neps0: .inf\n")
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


def test_a_scripts_own_options_are_split_from_the_config_overrides(capsys):
    """script_options takes the names it is given (with or without a value) and passes everything else on in order;
    positive_int stops with one line naming the flag. memory_plan.options, the plan's --world_size and --gpu_gib, on
    top of both."""
    from distill import memory_plan
    found, rest = config.script_options(["--seed=3", "--rows=8", "--lr", "--eps", "x"], {"rows": None, "eps": "1"})
    assert (found, rest) == ({"rows": "8", "eps": ""}, ["--seed=3", "--lr", "x"])
    assert config.positive_int("--rows", "12") == 12
    assert memory_plan.options(["--gpu_gib=40", "--seed=1"], world_size=8, gpu_gib=80) == (
        {"world_size": 8, "gpu_gib": 40}, ["--seed=1"])
    for raw in ("0", "-1", "2.5", "", "x"):
        with pytest.raises(SystemExit) as stop:
            memory_plan.options([f"--world_size={raw}"], world_size=8, gpu_gib=80)
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip() == f"error: --world_size: expected a positive integer, got {raw!r}"
