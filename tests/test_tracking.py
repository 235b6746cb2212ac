"""report_to: every metrics.jsonl row reaches the tracker as scalars at its step and the shown completions as text,
read back with each tracker's own reader (TensorBoard's event accumulator, trackio's SQLite storage, offline);
only the main process reports, the default reports nowhere, and a missing package is one line."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill import checkpoints, config, tracking

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# The few-second embedded run of test_train_small.py: 1-layer models, 2-digit sums, an evaluation every 2 steps.
TINY = ["--task_digits=2", "--train_size=300", "--eval_size=6", "--eval_samples=2", "--eval_batch_size=16",
        "--teacher_layers=1", "--teacher_hidden=32", "--teacher_sft_steps=4", "--student_layers=1",
        "--student_hidden=32", "--student_sft_steps=2", "--student_sft_examples=8", "--sft_batch_size=8",
        "--batch_size=2", "--rollouts_per_prompt=2", "--max_new_tokens=12", "--eval_every=2", "--warmup_steps=2",
        "--eps0=0.5", "--lr_warmup_steps=1", "--eval_max_new_tokens=12", "--num_threads=1", "--checkpoint_every=2"]


def train(out, cache, *extra):
    result = subprocess.run([sys.executable, str(ROOT / "train_small.py"), *TINY, f"--out_dir={out}",
                             f"--cache_dir={cache}", *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_tensorboard_holds_every_row_and_the_samples_also_after_a_resume(tmp_path):
    """A run interrupted after step 3 (checkpoint at 2) and resumed to step 4: TensorBoard's own reader finds every
    number of every metrics.jsonl row at its step, once (the resumed run purges the interrupted one's step 3), and
    each evaluation's shown completions as a text table."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    train(out, tmp_path / "cache", "--max_steps=3", "--report_to=tensorboard")
    train(out, tmp_path / "cache", "--max_steps=4", "--report_to=tensorboard", "--resume=true")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = {}
    for row in rows:
        for name, value in tracking.scalars(row).items():
            expected.setdefault(name, []).append((row["step"], value))
    assert "pass@1" in expected and "loss" in expected and "realised_kl" in expected
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        found = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in found] == [s for s, _ in points], name  # each step once, in order
        for (_, got), (_, want) in zip(found, points):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-30), name  # stored as float32
    # text through the text plugin's reader: the scalar reader above purges a restart's scalars, not its text
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator
    plugin_events = PluginAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    plugin_events.Reload()
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    texts = {(tag, e.step): e.tensor_proto.string_val[0].decode() for tag in plugin_events.Tags()["tensors"]
             if tag.endswith("/text_summary") for e in plugin_events.Tensors(tag)}
    assert {(tag.split("/")[1], step) for tag, step in texts} == {(s["model"], s["step"]) for s in samples}
    for s in samples:
        table = texts[(f"samples/{s['model']}/text_summary", s["step"])]
        assert f"| {s['problem']} | {s['question']} | {s['completion']} | {s['answer']} | {s['correct']} |" in table


def test_trackio_offline_gets_the_rows_and_a_samples_table(tmp_path):
    """trackio, local and offline (TRACKIO_DIR): each row's finite numbers at its step (a NaN, a metric the step did
    not measure, left out) and the samples as a trackio table, read back from trackio's own storage."""
    pytest.importorskip("trackio")
    script = f"""
import dataclasses, json, sys
sys.path.insert(0, {str(ROOT)!r})
from distill import checkpoints, config, tracking
out = {str(tmp_path / 'run')!r}
cfg = dataclasses.replace(config.load_config([]), report_to="trackio", out_dir=out)
log = checkpoints.RunLog(out, 0, resumed=False, write=True, cfg=cfg)
log.samples(0, "student", [dict(problem=0, question="1+2=", prompt="1+2=", answer="3", completion="#### 3",
                                correct=True)])
for row in json.loads({json.dumps(ROWS)!r}):
    log.record(row)
log.close()
from trackio.sqlite_storage import SQLiteStorage
print("LOGS", json.dumps(SQLiteStorage.get_logs("trb", tracking.run_name(out))))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                            env={**ENV, "TRACKIO_DIR": str(tmp_path / "trackio")}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    [logged] = [json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("LOGS ")]
    metrics = [{k: v for k, v in entry.items() if k not in ("timestamp", "samples/student")} for entry in logged]
    assert [m for m in metrics if len(m) > 1] == [{**tracking.scalars(row), "step": row["step"]} for row in ROWS]
    [table] = [entry["samples/student"] for entry in logged if "samples/student" in entry]
    assert table["_type"] == "trackio.table" and table["_value"] == [
        {"problem": 0, "question": "1+2=", "completion": "#### 3", "answer": "3", "correct": True}]


ROWS = [{"step": 0, "eps": 0.5, "beta": 0.0, "pass@1": 0.25, "greedy": 0.5},
        {"step": 1, "loss": 1.5, "eps": 0.25, "teacher_logprob": math.nan, "completion_tokens": 40},
        {"step": 2, "loss": 1.25, "eps": 0.0, "pass@1": 0.5, "greedy": 0.75}]


def test_only_the_main_process_reports_and_the_default_reports_nowhere(tmp_path, monkeypatch):
    """A RunLog of a process that does not write (FSDP rank > 0) opens no tracker even with report_to tensorboard;
    config.yaml's report_to is none, and its RunLog opens none and imports no tracker package."""
    cfg = config.load_config([])
    assert cfg.report_to == "none"
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    log = checkpoints.RunLog(tmp_path / "main", 0, resumed=False, write=True, cfg=cfg)
    log.record(ROWS[0])
    log.close()
    assert log.tracker is None and "torch.utils.tensorboard" not in sys.modules
    other = checkpoints.RunLog(tmp_path / "rank1", 0, resumed=False, write=False,
                               cfg=dataclasses.replace(cfg, report_to="tensorboard"))
    other.record(ROWS[0])
    other.close()
    assert other.tracker is None and not (tmp_path / "rank1").exists()


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb", "trackio"])
def test_a_missing_tracker_package_is_one_line_before_anything_loads(capsys, monkeypatch, report_to):
    """report_to naming a tracker whose package is not installed stops load_config with one line naming the key and
    the package."""
    monkeypatch.setitem(sys.modules, report_to, None)  # importlib.util.find_spec reports it missing
    with pytest.raises(SystemExit):
        config.load_config([f"--report_to={report_to}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: report_to: {report_to} needs the {report_to} package, which is not installed (pip "
                   f"install -r requirements-dev.txt)"]
