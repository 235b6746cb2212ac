"""scripts/prefix_test.py on a tiny embedded task, in this process: the arms of a repeat start from the same weights
and train on the same prompts, two equal arms differ by exactly 0, the teacher arm's rollouts have beta 1, repeat 0 of
the eps-0 arm is training's own first steps, the table is written, bad options stop with one line."""
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
from scripts import prefix_test  # noqa: E402

from test_probe_budget import TINY  # noqa: E402 - its few-second configuration
# Three arms (OPD twice, then the teacher), 3 repeats of 3 updates; every held-out problem (eval_size 6) x 2 samples,
# which is training's own evaluation, so that repeat 0 can be checked against a training run.
ARGS = ["--arms=0,0,inf", "--updates=3", "--repeats=3", "--eval_problems=6", "--samples=2"]


@pytest.fixture(scope="module")
def tested(tmp_path_factory):
    """(cache, out, main's result, what it printed) of one tiny prefix test; the cache serves the module."""
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("out") / "prefix"
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        result = prefix_test.main([*TINY, f"--cache_dir={cache}", *ARGS, f"--out={out}"])
    return cache, out, result, shown.getvalue()


def test_the_arms_of_a_repeat_start_from_the_same_weights_and_see_the_same_prompts(tested):
    """Every arm of every repeat starts from the one initial student (the same weights' fingerprint); within a repeat
    the arms train on the same prompt batches, and each repeat on batches of its own."""
    _, _, result, _ = tested
    repeats = result["per_repeat"]
    assert len(repeats) == 3 and all(len(repeat) == 3 for repeat in repeats)
    assert len({row["start"] for repeat in repeats for row in repeat.values()}) == 1
    prompts = [{row["prompts"] for row in repeat.values()} for repeat in repeats]
    assert all(len(p) == 1 for p in prompts) and len(set.union(*prompts)) == 3


def test_two_equal_arms_differ_by_exactly_zero(tested):
    """With arms 0,0 the second eps-0 arm is the first again (same student, prompts and noise): every endpoint of
    every repeat is equal, and each paired difference is 0 with a zero-width interval."""
    _, _, result, _ = tested
    first, second = result["labels"][:2]
    assert (first, second) == ("eps 0 (OPD)", "eps 0 #2") and result["reference"] == first
    for repeat in result["per_repeat"]:
        assert repeat[first] == repeat[second]
    for key, stat in result["arms"][second]["vs_reference"].items():
        assert stat["mean"] == 0 and stat["ci95"] == [0, 0], key
    assert "not significant at 3 repeats" in result["arms"][second]["verdicts"]["held_out_kl"]


def test_the_teacher_arm_rolls_out_at_beta_1_and_opd_at_beta_0(tested):
    """The eps-inf arm's rollouts have beta exactly 1 at every token (the teacher's prefixes) and a higher teacher
    log-prob than OPD's; the eps-0 arms' have beta 0 and realised KL 0."""
    _, _, result, _ = tested
    for repeat in result["per_repeat"]:
        teacher, opd = repeat["eps inf (teacher)"], repeat["eps 0 (OPD)"]
        assert teacher["eps"] == math.inf and teacher["beta"] == 1.0
        assert opd["beta"] == 0.0 and opd["realised_kl"] == 0.0
        assert teacher["teacher_logprob"] > opd["teacher_logprob"]
    assert result["arms"]["eps inf (teacher)"]["beta"]["mean"] == 1.0


def test_repeat_0_of_the_opd_arm_is_trainings_first_steps(tested, tmp_path):
    """A train_small run of method opd for `updates` steps on the same cache ends with the held-out endpoints and the
    per-step rollout means that repeat 0's eps-0 arm reports: the same student, prompts, rollout noise, lr schedule
    and evaluation."""
    cache, _, result, _ = tested
    history = train_small.train(load_config([*TINY, f"--cache_dir={cache}", f"--out_dir={tmp_path / 'run'}",
                                             "--method=opd", "--max_steps=3", "--eval_every=0",
                                             "--checkpoint_every=0", "--shown_problems=0"]))
    steps, final = [row for row in history if "loss" in row], history[-1]
    arm = result["per_repeat"][0]["eps 0 (OPD)"]
    for key in ("held_out_kl", "reference_logprob", "greedy", "pass@1"):
        assert arm[key] == final[key], key
    for key in ("teacher_logprob", "loss"):
        assert arm[key] == pytest.approx(sum(row[key] for row in steps) / len(steps), rel=1e-12), key


def test_the_table_is_printed_and_written(tested):
    """prefix_test.md holds the header (the command, the machine, the wall time), the per-arm table and the paired
    one, as printed; prefix_test.json holds what main returned."""
    _, out, result, text = tested
    markdown = (out / "prefix_test.md").read_text()
    assert markdown in text and json.loads((out / "prefix_test.json").read_text()) == json.loads(json.dumps(result))
    assert "python -m scripts.prefix_test --task_digits=2 " in markdown and "Machine: " in markdown
    assert "Wall time " in markdown and "OPD's own objective" in markdown
    assert "| arm | held-out KL | reference log-lik | greedy acc | pass@1 |" in markdown
    assert "| arm - eps 0 (OPD) | held-out KL |" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| eps ")]
    assert [row.split(" | ")[0] for row in rows] == ["| eps 0 (OPD)", "| eps 0 #2", "| eps inf (teacher)",
                                                      "| eps 0 #2", "| eps inf (teacher)"]


def test_the_arms_keep_their_order_and_get_0_first_where_missing():
    """Arms are kept in the order given, repeats too; 0 (the reference) is put first where missing; -0 is 0."""
    assert prefix_test.parse_arms("0.169,inf") == [0.0, 0.169, math.inf]
    assert prefix_test.parse_arms("inf,-0,0") == [math.inf, 0.0, 0.0]
    assert prefix_test.arm_labels([math.inf, 0.0, 0.0, 0.5]) == ["eps inf (teacher)", "eps 0 (OPD)", "eps 0 #2",
                                                                  "eps 0.5"]


@pytest.mark.parametrize("arg, option", [("--arms=0,abc", "--arms"), ("--arms=0,-0.1", "--arms"),
                                         ("--arms=", "--arms"), ("--arms=nan", "--arms"), ("--updates=0", "--updates"),
                                         ("--repeats=two", "--repeats"), ("--eval_problems=-1", "--eval_problems"),
                                         ("--eval_problems=401", "--eval_problems"), ("--samples=1.5", "--samples"),
                                         ("--out=", "--out"), ("--engine=vllm", "engine"),
                                         ("--config=configs/gsm8k_1gpu.yaml", "dataset")])
def test_a_bad_option_stops_with_one_line_naming_it(arg, option, capsys):
    """An arm that is not a number >= 0, a count that is not a positive integer, more held-out problems than
    eval_size, an empty --out, the vLLM engine or a real dataset: exit code 2 and one line naming it, before any model
    loads."""
    with pytest.raises(SystemExit) as stop:
        prefix_test.main([arg])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {option}: ") and err.count("\n") == 1


def test_help_lists_the_options_and_the_config_keys(capsys):
    """--help prints the usage with the script's options and every config key, and exits 0."""
    with pytest.raises(SystemExit) as stop:
        prefix_test.main(["--help"])
    shown = capsys.readouterr().out
    assert stop.value.code == 0
    assert all(flag in shown for flag in ("--arms=", "--updates=", "--repeats=", "--eval_problems=", "--samples=",
                                          "--out=", "--student_sft_steps=", "--lr_warmup_steps="))
