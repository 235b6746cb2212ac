"""gpu_check.py is ready for a GPU machine: its training runs are valid configs of the real-model path, and without a
GPU it writes a report that says so instead of failing."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill import config  # noqa: E402
from scripts import gpu_check  # noqa: E402


def models_folder(qwen3_folders, tmp_path):
    """The folder the GPU check writes its models and data to, as the training parts read it: the Qwen3-sized student
    and teacher linked in, and empty prompt and evaluation files."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("student", "teacher"):
        (models / name).symlink_to(qwen3_folders / name)
    for name in ("prompts.jsonl", "eval.jsonl"):
        (models / name).write_text("")
    return models


def test_training_parts_are_valid_configs(qwen3_folders, tmp_path):
    """The arguments the train and fsdp parts pass load as a config of the 1.7B <- 8B preset with every override
    (prompt-only training data, 512 new tokens, a TRB warmup), so no GPU minute is spent on a config error."""
    models = models_folder(qwen3_folders, tmp_path)
    cfg = config.load_config(gpu_check.run_args(models, tmp_path / "out"))
    assert (cfg.method, cfg.max_steps, cfg.max_new_tokens, cfg.eps0 > 0) == ("trb", 2, 512, True)


def test_without_a_gpu_it_reports_and_exits_cleanly(tmp_path):
    """On a machine without CUDA the check writes report.md naming the machine and stops, exit 0."""
    result = subprocess.run([sys.executable, "-m", "scripts.gpu_check", f"--out={tmp_path}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    assert "No CUDA device" in report and "transformers" in report


def test_the_engine_training_part_is_a_valid_config_and_the_parts_fit_eight_minutes(qwen3_folders, tmp_path):
    """The engine training step's arguments load (engine vllm, 1 step, the fraction from the memory plan), and the
    parts' time limits add up to under 8 minutes."""
    models = models_folder(qwen3_folders, tmp_path)
    cfg = config.load_config([*gpu_check.run_args(models, tmp_path / "out"), "--engine=vllm", "--max_steps=1"])
    assert (cfg.engine, cfg.max_steps, cfg.vllm_gpu_memory_utilization) == ("vllm", 1, 0)
    assert sum(gpu_check.LIMITS.values()) < 8 * 60


def test_the_report_compares_greedy_tokens_and_reads_memory(tmp_path):
    """compare_tokens counts the rows equal token for token and names where the others first differ; memory_table
    turns a measured run's JSON line into one row per moment, measured beside planned."""
    (tmp_path / "a.json").write_text("[[1, 2, 3], [4, 5, 6], [7, 8]]")
    (tmp_path / "b.json").write_text("[[1, 2, 3], [4, 9, 6], [7, 8, 9]]")
    line = gpu_check.compare_tokens(tmp_path / "a.json", tmp_path / "b.json")
    assert line.endswith("1 of 3 rows equal token for token; the others first differ at tokens [1, 2]")
    assert gpu_check.compare_tokens(tmp_path / "a.json", tmp_path / "missing.json").startswith("greedy tokens: not")
    run = {"measured_gib": {"at rest": 2.0, "rollout peak": 4.0}, "device_used_gib": {"at rest": 3.0,
           "rollout peak": 9.0}, "planned_gib": {"at rest": 2.5, "rollout peak": 10.0}, "losses": [0.5],
           "tokens_per_s": [100.0]}
    table = gpu_check.memory_table("some log\n" + json.dumps(run) + "\n")
    assert table[2] == "| at rest | 2.0 | 3.0 | 2.5 | 1.25 |" and table[3] == "| rollout peak | 4.0 | 9.0 | 10.0 | 2.50 |"
    assert gpu_check.memory_table("no JSON line") == []
