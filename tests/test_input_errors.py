"""Bad data and model inputs stop with one line that names them, never a traceback: an empty or broken dataset file,
a misspelled local folder, and a hub name that is neither in the local Hugging Face cache nor downloadable (offline,
or the hub unreachable), which must fail in seconds rather than after the libraries' retries. A hub name that is in
the cache loads without the hub."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill import config, math_data, models, synthetic_task
from scripts import evaluate, prepare_data

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: a connection is refused at once
NOT_CACHED = "no-such-org/no-such-model-7f3e"


def data_config(**values):
    return dataclasses.replace(config.load_config([]), **values)


def model_config(student, teacher=None):
    return dataclasses.replace(config.load_config([]), student=student, teacher=teacher or student)


def one_error_line(capsys, call, *args):
    """The single stderr line of call(*args), which must stop with exit code 2 (config.die)."""
    with pytest.raises(SystemExit) as stopped:
        call(*args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def tokenizer_folder(path):
    """A character tokenizer saved as a folder: what train_small.py loads before any data."""
    synthetic_task.char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def online(monkeypatch, tmp_path):
    """No offline variable, empty caches, and the hub at a closed port: a download is asked for and cannot happen."""
    import datasets
    import huggingface_hub
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


@pytest.fixture
def offline(online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return online


# ------------------------------------------------------------------------------------------------------------------
# Dataset files.


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.json", ""),
                                           ("list.json", "[]"), ("pretty.json", "[\n]\n")])
def test_a_file_without_rows_names_the_file(tmp_path, capsys, name, content):
    """An empty file, blank lines or an empty list: "FILE: no rows" (datasets' own loader says StopIteration)."""
    path = tmp_path / name
    path.write_text(content)
    line = one_error_line(capsys, math_data.load_splits, data_config(dataset=str(path)))
    assert line == f"error: dataset: {path}: no rows"


@pytest.mark.parametrize("name, content, number", [
    ("broken.jsonl", '{"question": "a", "answer": "1"}\n\n{"question": "b",\n{"question": "c"}\n', 3),
    ("first.jsonl", '{"question": "a"\n{"question": "b", "answer": "2"}\n', 1),
    ("lines.json", '{"question": "a", "answer": "1"}\n{"question": "b" "answer": "2"}\n', 2),
    ("document.json", '[\n  {"question": "a", "answer": "1"},\n  {"question": "b", "answer": "2"}\n  {}\n]\n', 4),
])
def test_a_line_that_is_not_json_names_the_file_and_the_line(tmp_path, capsys, name, content, number):
    """A broken line of JSON lines, or the line where a JSON document breaks: "FILE line N: not valid JSON"."""
    path = tmp_path / name
    path.write_text(content)
    line = one_error_line(capsys, math_data.load_splits, data_config(dataset=str(path)))
    assert line == f"error: dataset: {path} line {number}: not valid JSON"


def test_a_line_that_is_not_an_object_names_the_line(tmp_path, capsys):
    """JSON lines hold one object per line: a list in their middle is named by its line."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n["b", "2"]\n')
    line = one_error_line(capsys, math_data.load_splits, data_config(dataset=str(path)))
    assert line == f"error: dataset: {path} line 2: not a JSON object"


@pytest.mark.parametrize("name, content", [
    ("lines.json", "".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n\n" for i in range(4))),
    ("list.json", json.dumps([{"question": f"q{i}", "answer": str(i)} for i in range(4)], indent=2)),
    ("bom.jsonl", "\ufeff" + "".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(4))),
])
def test_what_the_json_loader_accepts_still_loads(tmp_path, name, content):
    """The check rejects nothing that datasets' json loader reads: JSON lines (blank lines skipped, a byte order mark
    allowed) under either suffix, and a list of rows written over several lines."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    train, held_out = math_data.load_splits(data_config(dataset=str(path), eval_size=2))
    assert sorted([*train["question"], *held_out["question"]]) == [f"q{i}" for i in range(4)]


def test_an_empty_benchmark_file_of_evaluate_names_the_file(tmp_path, capsys):
    """scripts/evaluate.py's --data copies and prepare_data.py's --source go through the same check."""
    path = tmp_path / "math500.jsonl"
    path.write_text("")
    bench = SimpleNamespace(key="math500", dataset="HuggingFaceH4/MATH-500", config="", split="test",
                                     question="problem", answer="answer", problems=0)
    assert one_error_line(capsys, evaluate.load_benchmark, bench, str(path)) == \
        f"error: --data math500: {path}: no rows"
    line = one_error_line(capsys, prepare_data.main, [f"--source={path}", f"--out={tmp_path / 'out.jsonl'}", "--n=1"])
    assert line == f"error: --source: {path}: no rows"


# ------------------------------------------------------------------------------------------------------------------
# Local paths that do not exist.


def test_a_misspelled_local_folder_is_no_such_folder(tmp_path, monkeypatch, capsys):
    """runs/smal/student when runs/ exists is a local path, not a hub name: it stops as "no such folder or file"
    wherever models, tokenizers and datasets are loaded, never with the hub's message about repo ids."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    missing = "runs/smal/student"
    assert one_error_line(capsys, models.load_tokenizer, model_config(missing)) == \
        f"error: student: cannot load a tokenizer from {missing!r}: no such folder or file"
    assert one_error_line(capsys, models.load_pretrained, "teacher", missing, model_config(missing), None) == \
        f"error: teacher: cannot load {missing!r}: no such folder or file"
    assert one_error_line(capsys, math_data.load_splits, data_config(dataset="runs/smal/data.jsonl")) == \
        "error: dataset: cannot load 'runs/smal/data.jsonl': no such folder or file"
    assert one_error_line(capsys, evaluate.load_tokenizer, missing, "--model", False) == \
        f"error: --model: cannot load a tokenizer from {missing!r}: no such folder or file"
    args = SimpleNamespace(trust_remote_code=False, model="")
    assert one_error_line(capsys, evaluate.load_model, ("dcp", str(tmp_path)), missing, args, None) == \
        f"error: --base: cannot load a model config from {missing!r}: no such folder or file"
    out = tmp_path / "out.jsonl"
    assert one_error_line(capsys, prepare_data.main, ["--source=runs/smal/ot3.jsonl", f"--out={out}", "--n=1"]) == \
        "error: --source: cannot load 'runs/smal/ot3.jsonl': no such folder or file"
    (tmp_path / "ot3.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}]}) + "\n")
    assert one_error_line(capsys, prepare_data.main, ["--source=ot3.jsonl", f"--out={out}", "--n=1",
                                                      "--tokenizer=runs/tok"]) == \
        "error: --tokenizer: cannot load a tokenizer from 'runs/tok': no such folder or file"


# ------------------------------------------------------------------------------------------------------------------
# Hub names: the local cache first, and one fast line when the hub cannot serve what the cache lacks.


def timed_error_line(capsys, call, *args):
    started = time.monotonic()
    line = one_error_line(capsys, call, *args)
    return line, time.monotonic() - started


def test_a_hub_name_not_in_the_cache_with_hf_hub_offline_set(offline, capsys):
    """HF_HUB_OFFLINE=1: loaded with local files only; what the cache lacks is named in one line, in seconds."""
    line, took = timed_error_line(capsys, models.load_tokenizer, model_config(NOT_CACHED))
    assert line == f"error: student: {NOT_CACHED} is not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    assert took < 10
    line, took = timed_error_line(capsys, math_data.load_splits, data_config(dataset="no-such-org/no-such-data"))
    assert line == "error: dataset: no-such-org/no-such-data is not in the local Hugging Face cache (HF_HUB_OFFLINE " \
                   "is set)"
    assert took < 10


def test_transformers_offline_and_datasets_offline_are_named(online, monkeypatch, capsys):
    """TRANSFORMERS_OFFLINE turns models offline as HF_HUB_OFFLINE does; HF_DATASETS_OFFLINE decides for datasets."""
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    line = one_error_line(capsys, models.load_pretrained, "teacher", NOT_CACHED, model_config(NOT_CACHED), None)
    assert line.endswith("(TRANSFORMERS_OFFLINE is set)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "yes")
    line = one_error_line(capsys, math_data.load_splits, data_config(dataset="no-such-org/no-such-data"))
    assert line.endswith("(HF_DATASETS_OFFLINE is set)")


def test_a_hub_name_not_in_the_cache_with_the_hub_unreachable(online, capsys):
    """No offline variable and the hub unreachable (HF_ENDPOINT at a closed port): one line naming the model or
    dataset and how to get it, in seconds, where the libraries alone retry for 25-50 s."""
    line, took = timed_error_line(capsys, models.load_tokenizer, model_config(NOT_CACHED))
    assert line == (f"error: student: {NOT_CACHED} is not in the local Hugging Face cache and 127.0.0.1:9 cannot be "
                    f"reached; download it where there is a network (hf download {NOT_CACHED}) or give a local folder")
    assert took < 10
    line, took = timed_error_line(capsys, math_data.load_splits, data_config(dataset="no-such-org/no-such-data"))
    assert line.startswith("error: dataset: no-such-org/no-such-data is not in the local Hugging Face cache and "
                           "127.0.0.1:9 cannot be reached; download it where there is a network (hf download "
                           "--repo-type dataset no-such-org/no-such-data --local-dir FOLDER)")
    assert took < 10
    for call, args in ((evaluate.load_tokenizer, (NOT_CACHED, "--model", False)),
                       (prepare_data.main, (["--source=no-such-org/no-such-data", "--out=x.jsonl", "--n=1"],))):
        line, took = timed_error_line(capsys, call, *args)
        assert "is not in the local Hugging Face cache and 127.0.0.1:9 cannot be reached" in line and took < 10


def test_an_unreachable_hub_is_never_asked_for_the_files(online, monkeypatch, capsys):
    """load_named tries the cache (local_files_only) and, when the hub does not answer, stops without the download
    attempt that would retry; hub_reachable is the one place that asks."""
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=models.HUB_CHECK_S: False)
    attempts = []

    def load(path, local_files_only):
        attempts.append(local_files_only)
        raise OSError("not in the cache")

    line = one_error_line(capsys, models.load_named, "student", NOT_CACHED, load)
    assert attempts == [True] and "huggingface.co" not in line and "127.0.0.1:9 cannot be reached" in line


def cached_hub_model(hub, repo_id="me/tiny"):
    """A tiny model and its tokenizer stored as the Hugging Face cache stores a download of repo_id."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("c" * 40)
    tokenizer = synthetic_task.char_tokenizer()
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    return repo_id


def test_a_cached_hub_model_loads_without_the_hub(online, monkeypatch):
    """A hub name in the local cache is read from it first: with the hub unreachable it loads at once, where
    transformers alone would retry the hub before falling back to the same files."""
    repo_id = cached_hub_model(online / "hub")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=None: pytest.fail("the hub was asked"))
    started = time.monotonic()
    tokenizer = models.load_tokenizer(model_config(repo_id))
    student = models.load_pretrained("student", repo_id, model_config(repo_id), None)
    assert evaluate.stop_ids(repo_id, tokenizer)[0] == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left" and student.config.vocab_size == len(tokenizer)
    assert time.monotonic() - started < 10


def cached_hub_dataset(tmp_path, cache, repo_id="me/toy", config_name="main"):
    """A dataset stored as datasets' cache stores an earlier load of repo_id: its Arrow files under
    <namespace>___<name>/<config>/<version>/<hash>/, built here from a local file."""
    import datasets
    source = tmp_path / "toy.jsonl"
    source.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(6)))
    datasets.load_dataset("json", data_files=str(source), cache_dir=str(tmp_path / "build"))
    built = next((tmp_path / "build").glob("json/*/*/*/dataset_info.json")).parent
    stored = cache / repo_id.replace("/", "___") / config_name / "0.0.0" / ("a" * 16)
    shutil.copytree(built, stored)
    name = repo_id.split("/")[-1]
    (stored / "json-train.arrow").rename(stored / f"{name}-train.arrow")
    info = json.loads((stored / "dataset_info.json").read_text())
    (stored / "dataset_info.json").write_text(json.dumps({**info, "config_name": config_name, "dataset_name": name}))
    return repo_id


def test_a_cached_hub_dataset_loads_without_the_hub(online, monkeypatch, capsys):
    """A hub dataset that an earlier load left in datasets' cache is read from there without asking the hub, quietly,
    and datasets' offline switch is as it was afterwards."""
    import datasets
    repo_id = cached_hub_dataset(online, online / "datasets")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=None: pytest.fail("the hub was asked"))
    offline_before = datasets.config.HF_HUB_OFFLINE
    train, held_out = math_data.load_splits(data_config(dataset=repo_id, dataset_config="main", eval_size=2))
    assert len(train) == 4 and len(held_out) == 2
    assert datasets.config.HF_HUB_OFFLINE == offline_before and capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------------------------
# Through the command line: what the user sees.


def run_train_small(tmp_path, *args, **env):
    environment = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    environment.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_DATASETS_CACHE=str(tmp_path / "datasets"),
                       TOKENIZERS_PARALLELISM="false", **env)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "train_small.py"),
                             f"--config={ROOT / 'configs' / 'gsm8k_1gpu.yaml'}", "--dataset_config=",
                             f"--out_dir={tmp_path / 'run'}", *args],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - started


def test_train_small_stops_in_one_line_without_a_traceback(tmp_path):
    """python train_small.py with an empty dataset file, a broken one, a misspelled folder, and a hub student that
    is not cached while the hub is unreachable: exit code 2, one line on stderr, no traceback, nothing written."""
    tokenizer_folder(tmp_path / "student")
    tokenizer_folder(tmp_path / "teacher")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"question": "a", "answer": "1"}\n{"question": \n')
    models_args = [f"--student={tmp_path / 'student'}", f"--teacher={tmp_path / 'teacher'}"]
    (tmp_path / "runs").mkdir()
    cases = [
        ([*models_args, f"--dataset={tmp_path / 'empty.jsonl'}"], {}, f"error: dataset: {tmp_path / 'empty.jsonl'}: "
                                                                      "no rows"),
        ([*models_args, f"--dataset={tmp_path / 'broken.jsonl'}"], {},
         f"error: dataset: {tmp_path / 'broken.jsonl'} line 2: not valid JSON"),
        (["--student=runs/smal/student", *models_args[1:], f"--dataset={tmp_path / 'empty.jsonl'}"], {},
         "error: student: no such folder or file: 'runs/smal/student'"),
        ([f"--student={NOT_CACHED}", f"--teacher={NOT_CACHED}", f"--dataset={tmp_path / 'broken.jsonl'}"],
         {"HF_ENDPOINT": CLOSED_PORT}, f"error: student: {NOT_CACHED} is not in the local Hugging Face cache and "
                                       "127.0.0.1:9 cannot be reached"),
    ]
    for args, env, expected in cases:
        result, took = run_train_small(tmp_path, *args, **env)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(err) == 1 and err[0].startswith(expected), result.stderr[-3000:]
        assert "Traceback" not in result.stderr + result.stdout and took < 60
    assert not (tmp_path / "run").exists()
