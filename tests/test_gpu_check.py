"""gpu_check.py is ready for a GPU machine: its training runs are valid configs of the real-model path, and without a
GPU it writes a report that says so instead of failing."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill import config  # noqa: E402
from scripts import gpu_check  # noqa: E402


def test_training_parts_are_valid_configs(qwen3_folders, tmp_path):
    """The arguments the train and fsdp parts pass load as a config of the 1.7B <- 8B preset with every override
    (prompt-only training data, 1024 new tokens, a TRB warmup), so no GPU minute is spent on a config error."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("student", "teacher"):
        (models / name).symlink_to(qwen3_folders / name)
    for name in ("prompts.jsonl", "eval.jsonl"):
        (models / name).write_text("")
    cfg = config.load_config(gpu_check.run_args(models, tmp_path / "out"))
    assert (cfg.method, cfg.max_steps, cfg.max_new_tokens, cfg.eps0 > 0) == ("trb", 2, 1024, True)


def test_without_a_gpu_it_reports_and_exits_cleanly(tmp_path):
    """On a machine without CUDA the check writes report.md naming the machine and stops, exit 0."""
    result = subprocess.run([sys.executable, "-m", "scripts.gpu_check", f"--out={tmp_path}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    assert "No CUDA device" in report and "transformers" in report
