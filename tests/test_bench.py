"""bench.py decode runs end to end on CPU at small shapes (the GPU table uses the same code at Qwen3's shapes)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_benchmark_runs_on_cpu():
    """Every requested setting prints one row with tokens/s for ours and Hugging Face's, their ratio and the rule's
    share; a bad --dtype is one line."""
    out = subprocess.run([sys.executable, "-m", "scripts.bench", "decode", "--settings=eager,static", "--runs=1", "--batch=2",
                          "--new_tokens=4", "--prompt_tokens=8"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("tiny <- small")]
    assert [row[5] for row in rows] == ["eager", "static"]
    for row in rows:
        assert float(row[6]) > 0 and float(row[7]) > 0 and float(row[8]) > 0 and row[9].endswith("%")
    bad = subprocess.run([sys.executable, "-m", "scripts.bench", "decode", "--dtype=float16"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["error: --dtype: expected float32 or bfloat16, "
                                                                       "got 'float16'"]


def test_token_rule_launches_few_ops_per_token():
    """The token rule as blended_generate runs it on any device (eager, reading values to stop its solver early) makes
    at most 400 top-level aten ops per token at Qwen3's vocabulary and 16 rows (about 230 measured; on a GPU each is a
    kernel launch), far fewer than the rule with no host read (all 50 iterations, both forms: about 7,300)."""
    sys.path.insert(0, str(ROOT))
    from scripts import bench
    eager, _ = bench.token_rule_ops(reads=True)
    traced, _ = bench.token_rule_ops(reads=False)
    assert eager <= 400 and traced > 10 * eager
