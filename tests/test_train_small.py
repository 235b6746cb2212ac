"""Smoke, resume and config tests of train_small.py: the real script in subprocesses, made tiny by overrides."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill import checkpoints, config  # noqa: E402
from conftest import folder_state, relative_weight_error  # noqa: E402
import train_small  # noqa: E402
import trb  # noqa: E402
from distill import math_data, synthetic_task  # noqa: E402

# A few-second configuration: 1-layer models, 2-digit sums, 2 prompts x 2 rollouts, 12 new tokens.
TINY = ["--task_digits=2", "--train_size=300", "--eval_size=6", "--eval_samples=2", "--eval_batch_size=16",
        "--teacher_layers=1", "--teacher_hidden=32", "--teacher_sft_steps=4", "--student_layers=1",
        "--student_hidden=32", "--student_sft_steps=2", "--student_sft_examples=8", "--sft_batch_size=8",
        "--batch_size=2", "--rollouts_per_prompt=2", "--max_new_tokens=12", "--max_steps=3", "--eval_every=2",
        "--warmup_steps=2", "--eps0=0.5", "--checkpoint_every=0", "--lr_warmup_steps=1", "--eval_max_new_tokens=12"]


def run(*args, check=True):
    """Run train_small.py with the given --key=value arguments; returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "train_small.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train_small.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache folder for the whole session: the tiny teacher and student inits are trained once."""
    return str(tmp_path_factory.mktemp("cache"))


def tiny(cache_dir, out_dir, *extra):
    return [*TINY, f"--cache_dir={cache_dir}", f"--out_dir={out_dir}", *extra]


@pytest.fixture(scope="session")
def real_folders(tmp_path_factory):
    """Tiny random 'real' models (chat template, two teacher EOS ids) and GSM8K-style data, saved to local folders."""
    from datasets import Dataset, DatasetDict
    root = tmp_path_factory.mktemp("real")
    tokenizer = synthetic_task.char_tokenizer("".join(chr(i) for i in range(32, 127)) + "\n")  # printable ASCII
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    for name, layers in (("student", 1), ("teacher", 2)):
        model = synthetic_task.tiny_qwen3(tokenizer, layers, 32, seed=layers)
        model.config.max_position_embeddings = 512
        if name == "teacher":  # a second stop id, like Qwen3 chat (<|im_end|>) next to Qwen3-Base (<|endoftext|>)
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")]
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = lambda n: {"question": [f"What is {i}+{i + 1}?" for i in range(n)],
                      "answer": [f"{i}+{i + 1}={2 * i + 1}\n#### {2 * i + 1}" for i in range(n)]}
    DatasetDict({"train": Dataset.from_dict(rows(8)), "test": Dataset.from_dict(rows(4))}).save_to_disk(root / "data")
    with open(root / "no_answer.jsonl", "w") as f:
        f.writelines(json.dumps({"question": q}) + "\n" for q in rows(8)["question"])
    with open(root / "problems.jsonl", "w") as f:  # one split only: train_small.py holds out eval_size rows
        f.writelines(json.dumps({"problem": q, "solution": f"\\boxed{{{a[-2:].strip()}}}"}) + "\n"
                     for q, a in zip(*rows(8).values()))
    return root


def real_args(folders, out_dir, *extra):
    """The one-GPU preset (real models need one), made tiny and CPU-sized by overrides."""
    return [f"--config={ROOT / 'configs' / 'gsm8k_1gpu.yaml'}", "--num_threads=1", "--dataset_config=",
            f"--student={folders / 'student'}", f"--teacher={folders / 'teacher'}", f"--dataset={folders / 'data'}",
            "--rollout_batch_size=0", "--micro_batch_size=0", "--eval_batch_size=16", "--eval_max_new_tokens=8",
            "--batch_size=2", "--rollouts_per_prompt=2", "--max_new_tokens=8", "--max_steps=2", "--eval_size=2",
            "--eval_samples=2", "--eval_every=0", "--checkpoint_every=0", f"--out_dir={out_dir}", *extra]


def test_smoke_run_writes_metrics_samples_summary_and_loadable_student(cache_dir, tmp_path):
    """A tiny TRB run logs every per-step metric, the greedy completions of the same three held-out problems at every
    evaluation (the teacher's once, at the start), writes summary.json and a student from_pretrained can load, and
    ends with a summary on stdout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    stdout = run(*tiny(cache_dir, tmp_path / "run", "--method=trb")).stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("loss", "eps", "beta", "realised_kl", "teacher_logprob", "teacher_entropy", "tokens_per_s"):
        assert all(key in r for r in rows[1:]), key
    assert all("pass@1" in rows[i] and "greedy" in rows[i] for i in (0, 2, 3))
    assert rows[1]["eps"] == 0.5 and rows[3]["eps"] == 0.0  # E5 anneals to zero at warmup_steps
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    shown = lambda model: [(r["step"], r["problem"], r["question"]) for r in samples if r["model"] == model]
    first = [(i, q) for _, i, q in shown("teacher")]
    assert [i for i, _ in first] == [0, 1, 2] and [step for step, _, _ in shown("teacher")] == [0, 0, 0]
    assert shown("student") == [(step, i, q) for step in (0, 2, 3) for i, q in first]
    assert all(type(r["completion"]) is str and type(r["correct"]) is bool for r in samples)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["final_pass@1"] <= 1
    # the summary on stdout: outputs, teacher and student pass@1, wall time, the comparison to run next
    assert f"(wall time). Outputs in {tmp_path / 'run'}/:" in stdout
    assert all(f"\n  {name} " in stdout for name in ("metrics.jsonl", "samples.jsonl", "summary.json", "student/"))
    assert (f"teacher {summary['teacher']['pass@1']:.3f}; student {summary['initial_pass@1']:.3f} at step 0 -> "
            f"{summary['final_pass@1']:.3f} at step 3") in stdout
    next_command = stdout.strip().splitlines()[-1]
    assert " --compare=opd,trb --out_dir=runs/compare " in next_command and "--max_steps=3" in next_command
    assert "--method=" not in next_command and f"--out_dir={tmp_path}" not in next_command
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    assert student.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("variant", ["opd", "skd", "chunked", "bf16"])
def test_other_behaviors_chunked_loss_and_bf16_run(cache_dir, tmp_path, variant):
    """Vanilla OPD, SKD, the chunked loss and bf16 autocast (float32 master weights) each complete a tiny run."""
    extra = {"opd": ["--method=opd"], "skd": ["--method=skd"], "bf16": ["--dtype=bfloat16"],
             "chunked": ["--chunked_loss=true", "--loss_chunk_mib=0.00035"]}[variant]
    run(*tiny(cache_dir, tmp_path / "run", "--max_steps=2", "--eval_every=0", *extra))
    assert (tmp_path / "run" / "summary.json").exists()


def test_compare_writes_json_table_and_plot(cache_dir, tmp_path):
    """--compare trains every arm for every seed (an arm is a method with its own overrides; TRB at eps0 = inf is
    named teacher warmup) and writes comparison.json, .md (the continuous endpoints first, then pass@1; one held-out
    problem: the teacher's, the initial student's and each arm's final greedy completion) and .png."""
    arms = "--compare=opd,trb,trb:eps0=inf:lr=0.001"
    run(*tiny(cache_dir, tmp_path / "cmp", arms, "--seeds=0,1", "--max_steps=2"))
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["opd", "trb", "trb:eps0=inf:lr=0.001"] and "vs_opd" not in methods["opd"]
    assert methods["trb:eps0=inf:lr=0.001"]["label"] == "teacher warmup" and methods["trb"]["label"] == "trb"
    runs = {arm: [json.loads(l) for l in open(tmp_path / "cmp" / f"{arm.replace(':', '_')}_seed1" / "metrics.jsonl")]
            for arm in methods}
    warmup = runs["trb:eps0=inf:lr=0.001"]
    assert warmup[1]["beta"] == 1.0 and max(r.get("lr", 0) for r in warmup) == 0.001 != runs["opd"][2]["lr"]
    for arm in ("trb", "trb:eps0=inf:lr=0.001"):
        for name, metric in (("final", "pass@1"), ("auc", "pass@1"), ("final_kl", "held_out_kl"),
                             ("mean_kl", "held_out_kl"), ("final_ref", "reference_logprob")):
            stat = methods[arm]["vs_opd"][name]  # the paired difference to OPD, seed by seed
            differences = [a - b for a, b in zip(methods[arm][name], methods["opd"][name])]
            assert stat["n_seeds"] == 2 and stat["mean"] == pytest.approx(sum(differences) / 2)
            assert stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
        evals = [r for r in runs[arm] if "pass@1" in r]
        assert methods[arm]["final_kl"][1] == evals[-1]["held_out_kl"]
        assert methods[arm]["mean_kl"][1] == pytest.approx(sum(r["held_out_kl"] for r in evals) / len(evals))
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| arm |"))
    assert header.index("held-out KL (final)") < header.index("reference log-lik") < header.index("final pass@1")
    assert "| teacher warmup | " in table.split("arm - opd")[1] and "seeds" in table
    example = table.split("Held-out problem 0, greedy, seed 0: ")[1].splitlines()  # the example at the end
    labels = [line[:24].strip() for line in example[2:7]]
    assert labels == ["teacher", "student, step 0", "opd, step 2", "trb, step 2", "teacher warmup, step 2"]
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    # Two runs at a time (the default) in worker processes give what one at a time in this process gives.
    run(*tiny(cache_dir, tmp_path / "serial", arms, "--seeds=0,1", "--max_steps=2", "--compare_workers=1"))
    assert json.loads((tmp_path / "serial" / "comparison.json").read_text())["methods"] == methods


def test_compare_relaunch_stops_at_once_and_resume_reads_finished_runs_back(cache_dir, tmp_path):
    """Relaunching a comparison whose runs left checkpoints stops with one line naming --resume=true before any run
    starts, and leaves every file as it was; relaunched with --resume=true it reads the finished runs back (none is
    retrained: their folders stay as they were) and writes the same comparison."""
    out = tmp_path / "cmp"
    command = tiny(cache_dir, out, "--compare=opd,trb", "--seeds=0", "--max_steps=1", "--checkpoint_every=1",
                   "--eval_every=0", "--compare_workers=1")
    run(*command)
    methods = json.loads((out / "comparison.json").read_text())["methods"]
    before = folder_state(out)
    result = run(*command, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: compare: out_dir: {out} holds an earlier comparison (comparison.json, ")
    assert "--resume=true" in lines[0] and folder_state(out) == before
    run(*command, "--resume=true")
    assert json.loads((out / "comparison.json").read_text())["methods"] == methods
    runs = lambda state: {name: v for name, v in state.items() if name.startswith(("opd_seed0/", "trb_seed0/"))}
    assert runs(folder_state(out)) == runs(before)


def test_a_signal_stops_a_comparison_and_resume_finishes_it(cache_dir, tmp_path):
    """SIGINT to a comparison's main process, two runs at a time: it passes the signal on, each run in progress saves
    a checkpoint, no new run starts, and one line gives the resume command (exit 130; the main process ends only once
    the pool has joined its workers); that command finishes the comparison."""
    out = tmp_path / "cmp"
    command = tiny(cache_dir, out, "--compare=opd,trb", "--seeds=0,1", "--max_steps=40", "--eval_every=0")
    result = interrupted_run(command, out / "opd_seed0", signal.SIGINT, rows=3)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGINT (each interrupted run saved a checkpoint in its folder); continue with: python "
        f"train_small.py {shlex.join(command + ['--resume=true'])}")
    assert list(out.glob("*_seed0/checkpoints/step_*")) and not (out / "comparison.json").exists()
    assert not list(out.glob("*_seed1/metrics.jsonl"))  # not started
    run(*command, "--resume=true")
    methods = json.loads((out / "comparison.json").read_text())["methods"]
    assert set(methods) == {"opd", "trb"} and all(len(m["final"]) == 2 for m in methods.values())


def test_a_compare_run_that_stops_returns_none_from_its_worker(tmp_path, monkeypatch):
    """A run that stops with config.die in a compare worker returns None, with its line in its progress.log, instead
    of ending the worker process (the pool would then wait for its result forever)."""
    import dataclasses
    from distill import compare
    monkeypatch.setattr(train_small, "train", lambda cfg: config.die("resume: nothing loads"))
    run_cfg = dataclasses.replace(config.load_config([]), out_dir=str(tmp_path / "run"), num_threads=0)
    assert compare._run(train_small.train, run_cfg) is None
    assert (tmp_path / "run" / "progress.log").read_text() == "error: resume: nothing loads\n"


RESUMED = ["--method=trb", "--warmup_steps=4", "--checkpoint_every=2"]  # the blend is still on after step 2


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
    """A 4-step run without interruption, that the resumed runs must equal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(*tiny(cache_dir, out, "--max_steps=4", *RESUMED))
    return out


def assert_same_run(a, b):
    """The final weights, every logged metric (but the wall-clock speed) and samples.jsonl of two runs are equal,
    bitwise."""
    from safetensors.torch import load_file
    first, second = (load_file(Path(out) / "student" / "model.safetensors") for out in (a, b))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in open(path)]
    assert strip(Path(a) / "metrics.jsonl") == strip(Path(b) / "metrics.jsonl")
    assert (Path(a) / "samples.jsonl").read_text() == (Path(b) / "samples.jsonl").read_text()  # not duplicated


def test_resume_after_checkpoint_is_bitwise_identical(cache_dir, tmp_path, uninterrupted):
    """
    Stop after a checkpoint, resume past a half-written save and half-written log lines: the final weights, every
    logged metric and samples.jsonl equal an uninterrupted run's, bitwise. Exact by construction: both runs execute the same ops
    on the same values in the same order on this machine (one thread, saved RNG states, weights and AdamW state
    restored exactly from safetensors and torch.save); nothing compares results across machines.
    """
    run(*tiny(cache_dir, tmp_path / "parts", "--max_steps=2", *RESUMED))
    half_written = tmp_path / "parts" / "checkpoints" / ".tmp-step_000003"  # as left by a kill during a save
    half_written.mkdir()
    (half_written / "state.pt").write_bytes(b"truncated")
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as log:  # as left by a kill in the middle of a write
        log.write('{"step": 3, "loss": 0.1')
    with open(tmp_path / "parts" / "samples.jsonl", "a") as log:  # a sample logged after the checkpoint, half a line
        log.write('{"step": 3, "model": "student", "problem": 0}\n{"step": 4, "mod')
    resumed_run = run(*tiny(cache_dir, tmp_path / "parts", "--max_steps=4", *RESUMED, "--resume=true"))
    assert "resumed from" in resumed_run.stdout and "step_000002" in resumed_run.stdout
    assert_same_run(uninterrupted, tmp_path / "parts")  # the logs cut back to the checkpoint, not duplicated


def test_two_arms_of_a_seed_share_their_rollout_noise_once_their_models_agree(cache_dir, tmp_path):
    """
    The rollouts of step k draw from a generator seeded by (seed, k) alone. A teacher warmup of one step (TRB at eps0
    = inf) decodes step 0 with the teacher, other tokens than OPD's (and rows of other lengths); with a
    learning rate too small to move the weights, both arms then hold the same student, and from step 1 on their
    sampled rollouts (temperature 1) are the same: the same completion tokens and per-token losses. (A generator run
    on across steps gives this only when step 0 happens to draw as many tokens in both arms; the next test shows that
    nothing carries over.) Distinct (seed, step, rank) give distinct seeds.
    """
    common = ["--max_steps=3", "--eval_every=0", "--lr=1e-12", "--temperature=1"]
    run(*tiny(cache_dir, tmp_path / "opd", *common, "--method=opd"))
    run(*tiny(cache_dir, tmp_path / "teacher", *common, "--method=trb", "--eps0=inf", "--warmup_steps=1"))
    rows = {arm: [json.loads(line) for line in open(tmp_path / arm / "metrics.jsonl") if '"loss"' in line]
            for arm in ("opd", "teacher")}
    assert rows["teacher"][0]["beta"] == 1.0 and rows["opd"][0]["beta"] == 0.0
    assert rows["teacher"][0]["teacher_logprob"] > rows["opd"][0]["teacher_logprob"]  # other tokens at step 0
    for a, b in zip(rows["opd"][1:], rows["teacher"][1:]):
        assert a["completion_tokens"] == b["completion_tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    seeded = lambda *key: train_small.rollout_generator(*key, "cpu").initial_seed()
    assert len({seeded(seed, step, rank) for seed in range(3) for step in range(3) for rank in range(3)}) == 27


def test_each_steps_rollouts_start_from_a_fresh_generator_of_seed_and_step(cache_dir, tmp_path, monkeypatch):
    """Every step's rollouts receive a generator in the state rollout_generator(seed, step, rank) starts in, whatever
    earlier steps drew: no sampler state carries from one step to the next."""
    handed = []
    decode = train_small.evaluation.HFDecoder.rollouts

    def recording(self, input_ids, attention_mask, generator, *args, **kwargs):
        handed.append(generator.get_state().clone())
        return decode(self, input_ids, attention_mask, generator, *args, **kwargs)

    monkeypatch.setattr(train_small.evaluation.HFDecoder, "rollouts", recording)
    cfg = config.load_config(tiny(cache_dir, tmp_path / "run", "--max_steps=3", "--eval_every=0", "--seed=5"))
    train_small.train(cfg)
    assert len(handed) == 3
    for step, state in enumerate(handed):
        assert torch.equal(state, train_small.rollout_generator(5, step, 0, "cpu").get_state())


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(cache_dir, tmp_path, uninterrupted):
    """A finished run keeps its two newest checkpoints (keep_checkpoints 2); with the newest one's model.safetensors
    truncated, --resume=true names it in one warning line, resumes from the one before, cuts the logs back to it and
    ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "run"
    run(*tiny(cache_dir, out, "--max_steps=4", *RESUMED))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    weights = out / "checkpoints" / "step_000004" / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    resumed = run(*tiny(cache_dir, out, "--max_steps=4", *RESUMED, "--resume=true"))
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: checkpoint {out / 'checkpoints' / 'step_000004'} cannot be loaded (") and warnings[0].endswith(
        "); trying the one before it"), resumed.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000002'}" in resumed.stdout
    assert_same_run(uninterrupted, out)


def test_every_checkpoint_damaged_stops_with_one_line(cache_dir, tmp_path):
    """keep_checkpoints=3 keeps exactly the newest 3; with all three damaged (weights truncated, AdamW state
    truncated, RNG state missing) --resume=true names each in a warning and stops with exit code 2 and one error
    line, no traceback, before the logs are touched (it does not start fresh)."""
    out = tmp_path / "run"
    run(*tiny(cache_dir, out, "--max_steps=4", "--checkpoint_every=1", "--keep_checkpoints=3", "--eval_every=0"))
    folders = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in folders] == ["step_000002", "step_000003", "step_000004"]
    for damaged in (folders[0] / "student" / "model.safetensors", folders[1] / "optimizer.pt"):
        damaged.write_bytes(damaged.read_bytes()[:100])
    (folders[2] / "state.pt").unlink()
    before = folder_state(out)
    result = run(*tiny(cache_dir, out, "--max_steps=5", "--checkpoint_every=1", "--resume=true"), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line.split(" cannot be loaded")[0] for line in lines if line.startswith("warning:")] == [
        f"warning: checkpoint {p}" for p in reversed(folders)]
    assert lines[-1] == (f"error: resume: none of the 3 checkpoints in {out / 'checkpoints'} can be loaded (see the "
                         f"warnings above); to start over instead, --resume=false --overwrite=true")
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert folder_state(out) == before


def test_keep_checkpoints_counts_back_from_the_one_just_saved(tmp_path):
    """After a save at step 4 with keep 2, step 4 and the complete checkpoint before it stay; older ones go, and so
    does a newer one (left by a resume that could not load it and fell back); a temporary folder is left alone."""
    from distill import checkpoints
    for name in ("step_000001", "step_000002", "step_000003", "step_000004", "step_000005", ".tmp-step_000006"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    checkpoints.remove_older_checkpoints(tmp_path, 4, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".tmp-step_000006", "step_000003",
                                                                            "step_000004"]


def test_relaunch_stops_and_keeps_the_run_unless_overwrite(cache_dir, tmp_path):
    """Relaunching a finished run's command (resume false) into its out_dir stops with exit code 2 and one line that
    names --resume=true and --overwrite=true, and leaves every file of the run as it was; with --overwrite=true it
    starts over: earlier checkpoints removed, logs begun again from step 0."""
    out = tmp_path / "run"
    command = tiny(cache_dir, out, "--max_steps=2", "--checkpoint_every=1", "--eval_every=0")
    run(*command)
    before = folder_state(out)
    assert any(name.startswith("checkpoints/step_000002/") for name in before)
    result = run(*command, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: out_dir: {out} holds an earlier run (checkpoints, metrics.jsonl, ")
    assert "continue it with --resume=true" in lines[0] and "--overwrite=true" in lines[0]
    assert folder_state(out) == before
    again = run(*tiny(cache_dir, out, "--max_steps=1", "--checkpoint_every=0", "--overwrite=true"))
    assert "resumed from" not in again.stdout and not (out / "checkpoints").exists()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1]


def test_a_finished_run_without_checkpoints_is_never_replaced_in_part(cache_dir, tmp_path):
    """A short run (no checkpoint) that finished, and was evaluated: relaunching it, fresh or with --resume=true,
    stops with one line and leaves every file byte-identical; with --overwrite=true the earlier run goes as a whole
    (its evaluations too), and the folder holds the new run only."""
    out = tmp_path / "run"
    command = tiny(cache_dir, out, "--max_steps=1", "--eval_every=0")
    run(*command)
    (out / "eval" / "quick" / "student").mkdir(parents=True)  # as scripts.evaluate leaves it
    (out / "eval" / "quick" / "student" / "gsm8k.json").write_text("{}")
    before = folder_state(out)
    assert {"metrics.jsonl", "summary.json", "run_config.yaml", "student/model.safetensors"} <= set(before)
    for extra in ([], ["--resume=true"]):
        result = run(*command, *extra, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith(f"error: out_dir: {out} holds an earlier run (")
        assert "it has no checkpoint to continue from; delete it as a whole with --overwrite=true" in lines[0]
        assert folder_state(out) == before
    run(*command, "--overwrite=true", "--seed=1")
    assert not (out / "eval").exists() and not (out / ".overwritten").exists()
    assert {path.name for path in out.iterdir()} == {"metrics.jsonl", "samples.jsonl", "summary.json",
                                                     "run_config.yaml", "student"}
    assert json.loads((out / "summary.json").read_text())["seed"] == 1


def test_an_interrupted_overwrite_is_finished_by_the_next(tmp_path):
    """An overwrite killed half-way leaves the earlier run partly in .overwritten: it still counts as an earlier run
    (a fresh run refuses the folder), and the next overwrite deletes it all."""
    for name in ("metrics.jsonl", "summary.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / ".overwritten" / "student").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")  # not a run's: never touched
    assert checkpoints.earlier_run(tmp_path) == ["metrics.jsonl", "summary.json", ".overwritten"]
    assert "holds an earlier run" in checkpoints.fresh_run_refused(tmp_path, resume=False, overwrite=False)
    checkpoints.discard_earlier_run(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"] and checkpoints.earlier_run(tmp_path) == []


def interrupted_run(command, out, *signals, rows=2):
    """train_small.py with `command`, sent `signals` (at once, in order) when metrics.jsonl holds `rows` rows; the
    CompletedProcess."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRB_LAUNCH"},  # run.sh's name for itself: not here
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train_small.py"), *command], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    log = Path(out) / "metrics.jsonl"
    while process.poll() is None and time.time() < deadline and not (
            log.exists() and log.read_text().count("\n") >= rows):
        time.sleep(0.01)
    for signum in signals:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_sigterm_checkpoints_and_resume_gives_the_uninterrupted_run(cache_dir, tmp_path, uninterrupted):
    """SIGTERM mid-run, with no periodic checkpoint: the step in progress finishes, a checkpoint is saved, one line
    names the step and the exact resume command, and the exit code is 128 + 15. That command continues the run to the
    uninterrupted run's weights, metrics (one row per step) and samples, bitwise."""
    out = tmp_path / "stopped"
    command = tiny(cache_dir, out, "--max_steps=4", *RESUMED, "--checkpoint_every=0")
    result = interrupted_run(command, out, signal.SIGTERM, rows=2)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    step = len(list(open(out / "metrics.jsonl"))) - 1
    assert 1 <= step < 4 and [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{step:06d}"]
    resume = f"python train_small.py {shlex.join(command + ['--resume=true'])}"
    assert last == (f"stopped by SIGTERM (at step {step}, checkpoint {out / 'checkpoints' / f'step_{step:06d}'}); "
                    f"continue with: {resume}")
    # the printed command as it stands, with this interpreter for `python` (the shell's may be another)
    subprocess.run([sys.executable, *shlex.split(resume)[1:]], cwd=ROOT, check=True, capture_output=True,
                   timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert_same_run(uninterrupted, out)


def test_a_second_signal_exits_at_once_and_a_repeated_one_does_not(monkeypatch):
    """The first SIGTERM or SIGINT is recorded; the same request delivered twice within a second (Slurm signals every
    process, torchrun passes its own on) is still the first; a second one later exits at once with 128 + its number.
    SIGUSR1 (compare.py's main process passing its signal on) never counts as a second one."""
    clock, exits = [100.0], []
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(checkpoints.os, "_exit", exits.append)
    interruption = checkpoints.Interruption(say=False)
    interruption.handle(signal.SIGUSR1, None)
    assert interruption.signal == signal.SIGTERM and not exits
    interruption.handle(signal.SIGINT, None)
    clock[0] += 0.5
    interruption.handle(signal.SIGTERM, None)
    interruption.handle(signal.SIGUSR1, None)
    assert interruption.signal == signal.SIGTERM and not exits
    clock[0] += 2
    interruption.handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


@pytest.mark.parametrize("dataset", ["save_to_disk", "jsonl"])
def test_real_model_path_with_local_models_and_dataset(real_folders, tmp_path, dataset):
    """Local HF models + a local dataset (save_to_disk / chunked loss, or one jsonl file) train; the student exports."""
    from transformers import AutoModelForCausalLM
    data = ["--chunked_loss=true"] if dataset == "save_to_disk" else [
        f"--dataset={real_folders / 'problems.jsonl'}", "--question_field=problem", "--answer_field=solution"]
    run(*real_args(real_folders, tmp_path / "run", *data))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["teacher"] is None
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")


def test_real_prompt_uses_chat_template_and_system_prompt(real_folders):
    """With a chat template, the prompt is the paper's system prompt and the question rendered through it."""
    from transformers import AutoTokenizer
    cfg = config.load_config(real_args(real_folders, "unused"))
    tokenizer = AutoTokenizer.from_pretrained(real_folders / "student")
    assert math_data.format_prompt("What is 1+2?", tokenizer, cfg) == (
        "<system>Please reason step by step, and put your final answer within \\boxed{}.\n<user>What is 1+2?\n<assistant>")


def test_config_errors_from_the_script_are_one_line_without_traceback(tmp_path):
    """The real script, given a malformed YAML file or a bad value, exits 2 with one stderr line and no traceback
    (tests/test_config.py checks every such error in-process)."""
    (tmp_path / "broken.yaml").write_text("method: trb\neps0: [0.02\nseed: 0\n")
    for args, expected in (([f"--config={tmp_path / 'broken.yaml'}"], "broken.yaml: line 3, column 5"),
                           (["--eps0=-0.1"], "eps0")):
        result = run(*args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is not None,
                    reason="vLLM is installed here: the engine starts")
def test_engine_vllm_without_vllm_is_one_line(tmp_path):
    """--engine=vllm in an environment without vLLM exits 2 with one line naming the key and the environment, before
    any model loads."""
    result = run(f"--out_dir={tmp_path / 'run'}", f"--cache_dir={tmp_path / 'cache'}", "--engine=vllm", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: engine: vllm") and ".venv-vllm" in lines[0]
    assert not (tmp_path / "cache").exists()


def test_dataset_without_needed_field_is_rejected(real_folders, tmp_path):
    """A dataset without the answer field stops with one line naming the dataset and the field."""
    result = run(*real_args(real_folders, tmp_path / "run", f"--dataset={real_folders / 'no_answer.jsonl'}"), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(lines) == 1 and "dataset" in lines[0] and "answer" in lines[0], result.stderr


def test_char_tokenizer_survives_save_and_load(tmp_path):
    """The offline tokenizer round-trips text and keeps pad/eos ids and left padding after save/from_pretrained."""
    from transformers import AutoTokenizer
    tokenizer = synthetic_task.char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+345=2+5+0=7;#### 357"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"] and loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 1, "left")
    assert loaded(["1", "123"], padding=True)["attention_mask"][0] == [0, 0, 1]


def test_answer_extraction_and_synthetic_solutions():
    """Answers come from the last \\boxed{} or '#### n'; every synthetic worked solution checks as its own sum."""
    assert math_data.extract_answer("so \\boxed{\\frac{1}{2}} and \\boxed{1,234}") == "1234"
    assert math_data.extract_answer("x\n#### 72\n") == "72" and math_data.extract_answer("no answer") is None
    assert math_data.reference_answer("17") == "17"
    import random
    rng = random.Random(0)
    for _ in range(200):
        row = synthetic_task.make_problem(rng, 4)
        a, b = map(int, row["question"][:-1].split("+"))
        assert math_data.extract_answer(row["answer"]) == str(a + b)


def test_rollout_and_micro_batching_leave_the_step_unchanged(cache_dir, tmp_path):
    """
    At temperature 0, rollouts in parts of 3 rows and the loss in micro-batches of 1 row give the full batch's
    per-step loss, gradient norm and final weights within 1e-5 relative (float32 sums in another order: measured
    ~2e-7). Rows stop at EOS after different lengths, so a per-micro-batch mean instead of the step's token mean
    would show in the loss and the gradient norm (AdamW's update alone is blind to the gradient's scale).
    """
    from safetensors.torch import load_file
    common = ["--temperature=0", "--method=trb", "--warmup_steps=2", "--max_steps=3", "--eval_every=0",
              "--teacher_sft_steps=300", "--max_new_tokens=32"]  # a teacher that ends its answers with EOS
    run(*tiny(cache_dir, tmp_path / "full", *common))
    run(*tiny(cache_dir, tmp_path / "parts", *common, "--rollout_batch_size=3", "--micro_batch_size=1"))
    full, parts = ([json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("full", "parts"))
    assert len(full) == len(parts) == 4 and full[1]["beta"] > 0  # the teacher decodes online in the first steps
    assert any(row["completion_tokens"] < 4 * 32 for row in full[1:])  # some rows stopped early
    for a, b in zip(full[1:], parts[1:]):
        assert a["completion_tokens"] == b["completion_tokens"]
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])
    a, b = (load_file(tmp_path / name / "student" / "model.safetensors") for name in ("full", "parts"))
    assert relative_weight_error(a, b) <= 1e-5


def test_cache_and_compile_keys_reach_every_decode(cache_dir, tmp_path, monkeypatch):
    """--cache=static reaches every blended_generate call of training and evaluation, and the run logs what the
    dynamic-cache run logs: the same sampled tokens (pass@1 and token counts equal) and losses within 1e-5 (the
    attention over the longer, masked static cache rounds differently)."""
    calls = []
    generate = trb.blended_generate
    monkeypatch.setattr(trb, "blended_generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    histories = {}
    for kind in ("dynamic", "static"):
        calls.clear()
        cfg = config.load_config(tiny(cache_dir, tmp_path / kind, f"--cache={kind}", "--max_steps=2"))
        histories[kind] = train_small.train(cfg)
        assert calls and all(k["decoding"].cache == kind and k["decoding"].compile is False for k in calls)
    for dynamic, static in zip(histories["dynamic"], histories["static"]):
        assert dynamic.get("pass@1") == static.get("pass@1")
        assert dynamic.get("completion_tokens") == static.get("completion_tokens")
        if "loss" in dynamic:
            assert static["loss"] == pytest.approx(dynamic["loss"], rel=1e-5)


def test_held_out_scores_equal_a_float64_recomputation_row_by_row():
    """train_small.held_out_scores (batched, left-padded prompts, right-padded completions, rows in calls of
    eval_batch_size) against each row alone in float64: the summed per-token reverse KL of the student to the teacher
    over its samples' tokens (EOS included where a sample stopped), and the student's summed log-likelihood of each
    reference solution and its EOS; rows whose reference is None (FSDP's uncounted padding) count for nothing."""
    tokenizer = synthetic_task.char_tokenizer()
    student, teacher = (synthetic_task.tiny_qwen3(tokenizer, layers, 32, seed=layers) for layers in (1, 2))
    cfg = config.load_config(["--eval_batch_size=3"])
    run_ = train_small.Run(cfg, train_small.SingleDevice(), tokenizer, student, teacher, None, [tokenizer.eos_token_id])
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    prompts = [ids("12+7="), ids("305+66="), ids("4+4=")]
    references = ["2+7+0=9;1+0+0=1;#### 19", "5+6+0=11;0+6+1=7;3+0+0=3;#### 371", None]
    samples = [[ids("9;#### 19") + [eos], ids("1+")], [ids("#### 3") + [eos], []], [ids("8") + [eos], ids("44")]]
    scores = train_small.held_out_scores(run_, prompts, references, samples)

    def logprobs(model, prompt, completion):  # float64 log-softmax at the positions predicting the completion
        model = model.double()
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
        return torch.log_softmax(logits, -1)

    kl = ll = 0.0
    kl_tokens = ll_tokens = 0
    with torch.no_grad():
        for prompt, reference, per_problem in zip(prompts, references, samples):
            if reference is None:
                continue
            for completion in per_problem:
                if completion:
                    s, t = logprobs(student, prompt, completion), logprobs(teacher, prompt, completion)
                    kl += float((s.exp() * (s - t)).sum())
                    kl_tokens += len(completion)
            solution = ids(reference) + [eos]
            ll += float(logprobs(student, prompt, solution).gather(-1, torch.tensor(solution)[:, None]).sum())
            ll_tokens += len(solution)
    assert scores["held_out_kl"][1] == kl_tokens and scores["reference_logprob"][1] == ll_tokens
    assert scores["held_out_kl"][0] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert scores["reference_logprob"][0] == pytest.approx(ll, rel=1e-5)
