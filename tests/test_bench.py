"""bench.py decode runs end to end on CPU at small shapes (the GPU table uses the same code at Qwen3's shapes)."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

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
    at most 400 top-level aten ops per token at Qwen3's vocabulary and 16 rows (about 250 measured; on a GPU each is a
    kernel launch), far fewer than the rule with no host read (all 50 iterations, both forms: about 7,400)."""
    sys.path.insert(0, str(ROOT))
    from scripts import bench
    eager, _ = bench.token_rule_ops(reads=True)
    traced, _ = bench.token_rule_ops(reads=False)
    assert eager <= 400 and traced > 10 * eager


def tiny_peer_setting():
    sys.path.insert(0, str(ROOT))
    from scripts import bench_peer
    return bench_peer, bench_peer.Setting(student_hidden=16, student_layers=1, teacher_hidden=24, teacher_layers=2,
                                          prompts=3, new_tokens=5)


def test_peer_benchmark_sides_do_the_same_work(tmp_path):
    """On TRL's own first rollout (Qwen3's vocabulary, tiny widths) train_small's step reads as many completion tokens
    and its loss equals TRL's DistillationTrainer loss (beta 1, the reverse KL) to 1e-4: the two sides time the same
    job. Skipped where TRL (a development requirement) is missing."""
    pytest.importorskip("trl")
    bench_peer, setting = tiny_peer_setting()
    folder = bench_peer.write_setting(tmp_path / "peer", setting, 2)
    (trl_loss, trl_tokens), (our_loss, our_tokens) = bench_peer.replay_loss(folder, setting)
    assert trl_tokens == our_tokens == setting.prompts * setting.new_tokens
    assert abs(our_loss - trl_loss) <= 1e-4 * abs(trl_loss) and trl_loss > 0


def test_peer_benchmark_runs_interleaved_rounds(tmp_path, capsys):
    """bench peer end to end at tiny widths: a fresh process per side and round, every step the full completion
    tokens, a table with each side's median and the ratios to TRL's; an unknown side is one line."""
    pytest.importorskip("trl")
    bench_peer, setting = tiny_peer_setting()
    args = SimpleNamespace(sides="opd,trl,trb", rounds=2, steps=2, peer_dir=str(tmp_path / "peer"), threads=1,
                           check=0)
    results = bench_peer.bench_peer(args, setting)
    for side in ("opd", "trl", "trb"):
        assert len(results[side]["times"]) == 4 and len(results[side]["peaks"]) == 2
        assert results[side]["tokens"] == [setting.prompts * setting.new_tokens] * 4
    out = capsys.readouterr().out
    assert "opd / TRL: time" in out and "trb / TRL: time" in out and "TRB warmup / OPD: time" in out
    with pytest.raises(SystemExit, match="unknown side 'tlr'"):
        bench_peer.bench_peer(SimpleNamespace(**(vars(args) | dict(sides="opd,tlr"))), setting)
