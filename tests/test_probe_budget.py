"""scripts/probe_budget.py on a tiny embedded task, in this process: the ends of the grid are the student and the
teacher, the named eps brackets the half-gap crossing of the printed table, a seed repeats its table, bad options stop
with one line."""
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_small  # noqa: E402
from distill.config import load_config  # noqa: E402
from scripts import probe_budget  # noqa: E402

# A few-second configuration: 1-layer models, 2-digit sums, a teacher trained far enough to be sharp (its log-prob of
# its own samples is far above that of the 2-step student's), 16 rollouts of up to 16 tokens per eps.
TINY = ["--task_digits=2", "--train_size=300", "--eval_size=6", "--eval_samples=2", "--eval_batch_size=16",
        "--teacher_layers=1", "--teacher_hidden=64", "--teacher_sft_steps=150", "--teacher_sft_lr=0.01",
        "--student_layers=1", "--student_hidden=32", "--student_sft_steps=2", "--student_sft_examples=8",
        "--sft_batch_size=16", "--batch_size=8", "--rollouts_per_prompt=2", "--max_new_tokens=16",
        "--eval_max_new_tokens=16"]


def probe(*argv):
    """(main's result, what it printed)."""
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        result = probe_budget.main(list(argv))
    return result, shown.getvalue()


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """One probe of the tiny task over the default grid; its cache (teacher, student init) serves the module."""
    cache = tmp_path_factory.mktemp("cache")
    return (cache, *probe(*TINY, f"--cache_dir={cache}", "--rows=16"))


def printed_table(text):
    """{eps: (beta, realised KL, teacher log-prob, correct, length)} of the printed table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["eps", "beta"]) + 1
    rows = {}
    for line in lines[start:]:
        words = line.split()
        if len(words) != 6:
            break
        rows[float(words[0])] = tuple(float(w) for w in words[1:])
    return rows


def test_eps_0_is_the_student_and_inf_the_teacher(probed):
    """Every eps of the default grid has a row; eps 0 samples the student (beta 0, realised KL 0, exactly), eps inf the
    teacher (beta 1), whose tokens the teacher rates higher; each finite eps stays in its trust region."""
    _, result, _ = probed
    table = {row["eps"]: row for row in result["table"]}
    assert list(table) == [float(e) for e in probe_budget.DEFAULT_GRID.split(",")]
    assert table[0.0]["beta"] == 0.0 and table[0.0]["realised_kl"] == 0.0
    assert table[math.inf]["beta"] == 1.0
    assert table[math.inf]["teacher_logprob"] >= table[0.0]["teacher_logprob"]
    assert all(0 <= row["beta"] <= 1 and row["realised_kl"] <= eps * 1.001 for eps, row in table.items()
               if math.isfinite(eps))
    assert result["rows"] == 16 and result["seed"] == 0 and result["strength"] == "student_sft_steps=2"


def test_the_named_eps_brackets_the_half_gap_crossing_of_the_printed_table(probed):
    """The header names the command, strength, seed and rows; the table printed is the one returned; the interval named
    in the last line is the first whose ends straddle the midpoint of the printed eps-0 and eps-inf log-probs, and the
    estimate lies inside it."""
    _, result, text = probed
    header = text.splitlines()[0]
    assert header.startswith("python -m scripts.probe_budget --task_digits=2 ")
    assert "student_sft_steps=2, seed=0, rows=16" in header
    shown = printed_table(text)
    assert list(shown) == result["grid"]
    for row in result["table"]:
        assert shown[row["eps"]][2] == pytest.approx(row["teacher_logprob"], abs=1e-4)
    lp = {eps: values[2] for eps, values in shown.items()}
    target = (lp[0.0] + lp[math.inf]) / 2
    assert result["interval"] is not None, result["line"]  # the tiny task is chosen so that a finite eps reaches it
    lo, hi = result["interval"]
    finite = [eps for eps in shown if math.isfinite(eps)]
    crossings = [(a, b) for a, b in zip(finite, finite[1:]) if lp[a] < target <= lp[b]]
    assert crossings[0] == (lo, hi)
    assert text.splitlines()[-1] == result["line"] and f"({lo:g}, {hi:g}]" in result["line"]
    assert lo == 0 or lo < result["estimate"] <= hi


def test_the_same_seed_gives_the_same_table_twice(probed):
    """A second probe with the same arguments (models from the cache) prints and returns the same table and names the
    same eps."""
    cache, result, text = probed
    again, again_text = probe(*TINY, f"--cache_dir={cache}", "--rows=16")
    assert again["table"] == result["table"] and printed_table(again_text) == printed_table(text)
    assert again_text.splitlines()[-1] == text.splitlines()[-1]


def test_the_rows_at_0_and_eps0_are_the_rollouts_of_training_step_0(probed, tmp_path):
    """A one-step run of train_small with method opd, and with trb at eps0 = 0.5, logs the beta, realised KL, teacher
    log-prob and completion tokens of the probe's rows at eps 0 and 0.5: same models, prompts and sampler."""
    cache, result, _ = probed
    table = {row["eps"]: row for row in result["table"]}
    for method, eps in (("opd", 0.0), ("trb", 0.5)):
        out = tmp_path / method
        train_small.train(load_config([*TINY, f"--cache_dir={cache}", f"--out_dir={out}", f"--method={method}",
                                       "--eps0=0.5", "--warmup_steps=2", "--max_steps=1", "--eval_every=0",
                                       "--checkpoint_every=0", "--shown_problems=0"]))
        step = [json.loads(line) for line in open(out / "metrics.jsonl")][1]
        assert step["eps"] == eps and step["completion_tokens"] == round(table[eps]["length"] * result["rows"])
        for name in ("beta", "realised_kl", "teacher_logprob"):
            assert step[name] == pytest.approx(table[eps][name], rel=1e-6, abs=1e-9), (method, name)


def test_half_gap_says_when_no_finite_eps_reaches_it_or_the_grid_starts_too_late():
    """No finite eps at the midpoint: one line saying so, no interval; reached already at the first eps above 0: the
    interval from 0, no interpolation; no gap at all: said so."""
    table = lambda *lps: [{"eps": e, "teacher_logprob": lp} for e, lp in zip((0.0, 0.1, 1.0, math.inf), lps)]
    _, interval, estimate, line = probe_budget.half_gap(table(-3.0, -2.9, -2.5, -1.0))
    assert interval is None and estimate is None and "no finite eps" in line and "\n" not in line
    _, interval, estimate, line = probe_budget.half_gap(table(-3.0, -1.5, -1.2, -1.0))
    assert interval == (0.0, 0.1) and estimate is None
    _, interval, estimate, _ = probe_budget.half_gap(table(-3.0, -2.5, -1.5, -1.0))
    assert interval == (0.1, 1.0) and estimate == pytest.approx(10 ** -0.5)  # halfway from -2.5 to -1.5 in log eps
    _, interval, _, line = probe_budget.half_gap(table(-1.0, -1.2, -1.5, -2.0))
    assert interval is None and "no gap" in line


def test_the_grid_gets_its_ends_sorted_and_once():
    """A grid without 0 or inf gets both (the ends of the gap); repeats and -0 collapse; rows stay as given."""
    grid, rows, rest = probe_budget.options(["--eps_grid=0.5,1e-2,0.5,-0", "--seed=3", "--rows=8"])
    assert grid == [0.0, 0.01, 0.5, math.inf] and rows == 8 and rest == ["--seed=3"]


@pytest.mark.parametrize("arg, option", [("--eps_grid=0,abc,inf", "--eps_grid"), ("--eps_grid=0,-0.1", "--eps_grid"),
                                         ("--eps_grid=", "--eps_grid"), ("--eps_grid=nan", "--eps_grid"),
                                         ("--rows=0", "--rows"), ("--rows=two", "--rows")])
def test_a_bad_option_stops_with_one_line_naming_it(arg, option, capsys):
    """A grid value that is not a number >= 0, an empty grid, or rows that are not a positive integer: exit code 2 and
    one line naming the option, before any model loads."""
    with pytest.raises(SystemExit) as stop:
        probe_budget.main([arg])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {option}: ") and err.count("\n") == 1


def test_help_lists_the_options_and_the_config_keys(capsys):
    """--help prints the usage with the script's options and every config key, and exits 0."""
    with pytest.raises(SystemExit) as stop:
        probe_budget.main(["--help"])
    shown = capsys.readouterr().out
    assert stop.value.code == 0
    assert all(flag in shown for flag in ("--eps_grid=", "--rows=", "--student_sft_steps=", "--seed="))
