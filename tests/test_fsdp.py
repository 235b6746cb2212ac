"""Smoke tests of train_fsdp.py: the real script under `torchrun --nproc_per_node=2` (gloo, CPU), tiny models, checked
against train_small.py on the same data. Runs are shared between tests through module-scoped fixtures."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BASE_EOS, CHAT_EOS, folder_state, qwen3_args, relative_weight_error
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # --standalone: a free port per run
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}

# Greedy rollouts (temperature 0) so both scripts visit the same tokens; 2 prompts x 2 rollouts = 2 rows per rank;
# a TRB warmup (eps > 0 for 3 steps, then vanilla OPD) so the teacher decodes online too; a teacher trained enough
# to end answers with EOS, so rows (and ranks) have different token counts.
TINY = ["--task_digits=2", "--train_size=300", "--eval_size=5", "--eval_samples=2", "--eval_batch_size=4",
        "--teacher_layers=1", "--teacher_hidden=32", "--teacher_sft_steps=300", "--student_layers=2",
        "--student_hidden=32", "--student_sft_steps=2", "--student_sft_examples=8", "--sft_batch_size=8",
        "--batch_size=2", "--rollouts_per_prompt=2", "--max_new_tokens=32", "--max_steps=5", "--eval_every=0",
        "--method=trb", "--warmup_steps=3", "--eps0=0.5", "--temperature=0", "--lr_warmup_steps=1",
        "--eval_max_new_tokens=32"]
FSDP_ONLY = ["--teacher_sharding=shard", "--rollout_batch_size=1", "--micro_batch_size=1"]  # 2 of each per rank
RELATIVE = 1e-4


def run(command, timeout=240):
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command[:6])} ... failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def stopped_on_every_rank(out_dir, cache_dir, *extra, nproc=2):
    """
    Launches train_fsdp.py as nproc processes with the variables torchrun would set, but without torchrun (which
    kills the other ranks once one exits, hiding what each decided), and checks that every rank exited by itself
    with code 2 and that only rank 0 wrote to stderr, with no traceback; returns rank 0's stderr.
    """
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    logs = [Path(f"{out_dir}.rank{rank}.stderr") for rank in range(nproc)]  # next to out_dir, not in it
    processes = []
    for rank in range(nproc):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
        with open(logs[rank], "w") as err:
            processes.append(subprocess.Popen([sys.executable, "train_fsdp.py", *TINY, *FSDP_ONLY,
                                               f"--cache_dir={cache_dir}", f"--out_dir={out_dir}", *extra],
                                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
    try:
        codes = [process.wait(timeout=240) for process in processes]  # a rank left in a collective would hang here
    finally:
        for process in processes:
            process.kill()
    errors = [log.read_text() for log in logs]
    assert codes == [2] * nproc and not any(errors[1:]) and "Traceback" not in errors[0], errors
    return errors[0]


def train_small(out_dir, cache_dir, *extra):
    return run([sys.executable, "train_small.py", *TINY, f"--cache_dir={cache_dir}", f"--out_dir={out_dir}", *extra])


def fsdp_command(out_dir, cache_dir, *extra, nproc=2):
    return [*TORCHRUN, f"--nproc_per_node={nproc}", "train_fsdp.py", *TINY, *FSDP_ONLY, f"--cache_dir={cache_dir}",
            f"--out_dir={out_dir}", *extra]


def kill_tree(pid):
    """SIGKILL a process and its descendants (torchrun starts each rank in its own session, so killpg misses them)."""
    tree, i = [pid], 0
    while i < len(tree):
        for children in Path(f"/proc/{tree[i]}/task").glob("*/children"):
            tree += [int(child) for child in children.read_text().split()]
        i += 1
    for member in reversed(tree):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def metrics(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]


def weights(out_dir):
    return load_file(Path(out_dir) / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """train_small.py and train_fsdp.py (2 ranks), 5 identical greedy steps each; the FSDP run checkpoints every
    2 steps. The tiny teacher and student inits are trained once, by train_small.py, into a shared cache."""
    root = tmp_path_factory.mktemp("fsdp")
    cache = root / "cache"
    train_small(root / "small", cache, "--checkpoint_every=0")
    run(fsdp_command(root / "fsdp", cache, "--checkpoint_every=2"))
    return root


def test_fsdp_reproduces_single_process_losses_and_weights(runs):
    """
    5 greedy steps on 2 ranks give train_small.py's per-step loss and final weights within 1e-4 relative. Gradients
    reduced over ranks sum in another order, so weights differ by ~1e-6; greedy rollouts from them visit the same
    tokens (equal token counts) unless two logits tie that closely, which would show as a loss mismatch too. Held-out
    greedy accuracy may then differ by at most one problem of the 6. Both log the same shown problems (samples.jsonl).
    """
    small, fsdp = metrics(runs / "small"), metrics(runs / "fsdp")
    assert [r["step"] for r in fsdp] == [r["step"] for r in small] == [0, 1, 2, 3, 4, 5]
    for a, b in zip(small[1:], fsdp[1:]):
        assert a["completion_tokens"] == b["completion_tokens"]  # the same global token count normalises the loss
        assert abs(a["loss"] - b["loss"]) <= RELATIVE * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= RELATIVE * a["grad_norm"]
        assert a["eps"] == b["eps"] and abs(a["beta"] - b["beta"]) <= 1e-6  # eps: the same kl_budget arithmetic
    assert abs(small[-1]["greedy"] - fsdp[-1]["greedy"]) <= 1 / 5 + 1e-9
    assert relative_weight_error(weights(runs / "small"), weights(runs / "fsdp")) <= RELATIVE
    # samples.jsonl: every rank decodes the shown problems (the sharded teacher's too), rank 0 logs them once
    shown = lambda out: [(r["step"], r["model"], r["problem"]) for r in map(json.loads, open(out / "samples.jsonl"))]
    assert shown(runs / "fsdp") == shown(runs / "small") == [(s, m, i) for s, m in ((0, "teacher"), (0, "student"),
                                                                                  (5, "student")) for i in range(3)]


def test_fsdp_rollout_and_micro_batching_leave_the_step_unchanged(runs):
    """Under FSDP at temperature 0, all of a rank's rows in one rollout call and one micro-batch (teacher replicated)
    give the per-step loss and final weights of 1-row calls and micro-batches (teacher sharded) within 1e-5."""
    run(fsdp_command(runs / "fsdp_full_batch", runs / "cache", "--checkpoint_every=0", "--rollout_batch_size=0",
                     "--micro_batch_size=0", "--teacher_sharding=replicate"))
    rows = metrics(runs / "fsdp")[1:]
    assert any(row["completion_tokens"] < 4 * 32 for row in rows)  # rows of different lengths
    for a, b in zip(rows, metrics(runs / "fsdp_full_batch")[1:], strict=True):
        assert a["completion_tokens"] == b["completion_tokens"]
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])
    assert relative_weight_error(weights(runs / "fsdp"), weights(runs / "fsdp_full_batch")) <= 1e-5


def test_chunked_loss_with_replicated_teacher_reproduces_single_process(runs):
    """chunked_opd_loss (head weights used outside FSDP's forward), replicated teacher: losses, weights within 1e-4."""
    extra = ["--chunked_loss=true", "--loss_chunk_mib=0.00035", "--max_steps=3", "--checkpoint_every=0"]
    train_small(runs / "small_chunked", runs / "cache", *extra)
    run(fsdp_command(runs / "fsdp_chunked", runs / "cache", *extra, "--teacher_sharding=replicate"))
    for a, b in zip(metrics(runs / "small_chunked")[1:], metrics(runs / "fsdp_chunked")[1:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= RELATIVE * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    assert relative_weight_error(weights(runs / "small_chunked"), weights(runs / "fsdp_chunked")) <= RELATIVE


def test_stop_check_every_k_tokens_leaves_training_unchanged(runs):
    """
    Asking "are all ranks done?" every 16 tokens (the presets' value) instead of every token (the module's runs)
    decodes up to 15 more padding steps and gives the same run: the extra steps are masked out and each loss
    micro-batch is trimmed to its own rows, so the losses, gradient norms and weights agree (measured: identical).
    """
    run(fsdp_command(runs / "fsdp_every_token", runs / "cache", "--checkpoint_every=0", "--stop_check_every=16"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    for a, b in zip(strip(metrics(runs / "fsdp")), strip(metrics(runs / "fsdp_every_token")), strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * abs(a[k]) for k in a), (a, b)
    assert relative_weight_error(weights(runs / "fsdp"), weights(runs / "fsdp_every_token")) <= 1e-6


def test_static_cache_under_fsdp_leaves_training_unchanged(runs):
    """The presets' decoding, a StaticCache per model and a stop check every 16 tokens, on FSDP modules (a sharded
    teacher included): the same greedy tokens as the dynamic cache, so the same token counts and the same losses,
    gradient norms and weights within 1e-5 (the rollout's own statistics, read from decode logits computed over a
    longer masked cache, within 1e-4)."""
    run(fsdp_command(runs / "fsdp_static", runs / "cache", "--checkpoint_every=0", "--stop_check_every=16",
                     "--cache=static"))
    for a, b in zip(metrics(runs / "fsdp"), metrics(runs / "fsdp_static"), strict=True):
        assert a.get("completion_tokens") == b.get("completion_tokens"), (a, b)
        for key, tolerance in (("loss", 1e-5), ("grad_norm", 1e-5), ("teacher_logprob", 1e-4), ("beta", 1e-4)):
            if key in a:
                assert abs(a[key] - b[key]) <= tolerance * max(abs(a[key]), 1e-3), (key, a, b)
    assert relative_weight_error(weights(runs / "fsdp"), weights(runs / "fsdp_static")) <= 1e-5


def test_hsdp_and_activation_checkpointing_reproduce_single_process(runs):
    """HSDP on a 2-D mesh (hsdp_shard_size=1: two replicas of one shard each, gradients all-reduced across them) with
    per-layer activation checkpointing of the student: train_small.py's losses and weights within 1e-4."""
    run(fsdp_command(runs / "hsdp", runs / "cache", "--checkpoint_every=0", "--hsdp_shard_size=1",
                     "--activation_checkpointing=true"))
    for a, b in zip(metrics(runs / "small")[1:], metrics(runs / "hsdp")[1:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= RELATIVE * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= RELATIVE * a["grad_norm"]
    assert relative_weight_error(weights(runs / "small"), weights(runs / "hsdp")) <= RELATIVE


def test_hsdp_shard_size_must_divide_the_ranks(capsys):
    """A shard group size that does not divide the world stops with one line naming the key."""
    import train_fsdp
    with pytest.raises(SystemExit):
        train_fsdp.device_mesh(torch.device("cpu"), 4, 3)
    assert capsys.readouterr().err.strip().startswith("error: hsdp_shard_size:")


def test_fsdp_export_keeps_every_stop_id_at_qwen3_sizes(qwen3_folders, tmp_path):
    """train_fsdp.py at Qwen3's vocabulary (Base student, chat teacher): rank 0's export stops at both EOS ids."""
    from transformers import GenerationConfig
    run([*TORCHRUN, "--nproc_per_node=2", "train_fsdp.py", *qwen3_args(qwen3_folders, tmp_path / "run"),
         "--teacher_sharding=shard"])
    exported = GenerationConfig.from_pretrained(tmp_path / "run" / "student")
    assert exported.eos_token_id == [BASE_EOS, CHAT_EOS] and exported.pad_token_id == BASE_EOS


def test_exported_student_loads_with_from_pretrained(runs):
    """Rank 0's export is a plain Hugging Face folder: from_pretrained gives the unwrapped class and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    student = AutoModelForCausalLM.from_pretrained(runs / "fsdp" / "student")
    tokenizer = AutoTokenizer.from_pretrained(runs / "fsdp" / "student")
    assert type(student).__name__ == student.config.architectures[0] == "Qwen3ForCausalLM"
    ids = tokenizer(["12+34="], return_tensors="pt")["input_ids"]
    assert torch.isfinite(student(input_ids=ids).logits).all()
    summary = json.loads((runs / "fsdp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 5


def test_kill_and_resume_equals_uninterrupted_run(runs):
    """
    SIGKILL after a DCP checkpoint, with a half-written last metrics line; resume at 2 ranks: the same metrics and
    weights as no interruption, bitwise (the same ops in the same order on this machine, RNG states restored); at 1
    rank: weights within 1e-4 relative (the reduction over ranks changes order).
    """
    out = runs / "killed"
    with open(runs / "killed.log", "w") as log:
        process = subprocess.Popen(fsdp_command(out, runs / "cache", "--checkpoint_every=2"), cwd=ROOT, env=ENV,
                                   stdout=log, stderr=log)
        deadline = time.time() + 200
        while not list(out.glob("checkpoints/step_*")) and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        kill_tree(process.pid)  # both ranks and torchrun, wherever they are
        process.wait()
    assert list(out.glob("checkpoints/step_*")), (runs / "killed.log").read_text()[-3000:]
    with open(out / "metrics.jsonl", "a") as log:  # as left by a kill in the middle of a write
        log.write('{"step": 4, "loss": 0.1')
    shutil.copytree(out, runs / "killed_one_rank")
    run(fsdp_command(out, runs / "cache", "--checkpoint_every=2", "--resume=true"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(metrics(out)) == strip(metrics(runs / "fsdp"))
    assert relative_weight_error(weights(runs / "fsdp"), weights(out)) == 0.0
    # DCP reshards the student and AdamW state for another world size (the sampler RNG restarts; greedy here).
    run(fsdp_command(runs / "killed_one_rank", runs / "cache", "--checkpoint_every=2", "--resume=true", nproc=1))
    assert relative_weight_error(weights(runs / "fsdp"), weights(runs / "killed_one_rank")) <= RELATIVE


def test_sigterm_under_torchrun_checkpoints_every_rank_and_resume_matches(runs):
    """
    SIGTERM to torchrun mid-run (no periodic checkpoint): torchrun passes it on to both ranks, which agree through
    the step's sums, finish the same step and save one DCP checkpoint there; rank 0 prints the step and the resume
    command (torchrun then reports the signal itself). That command continues the run to the uninterrupted run's
    metrics, one row per step, and weights, bitwise.
    """
    out = runs / "sigterm"
    command = fsdp_command(out, runs / "cache", "--checkpoint_every=0")
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, log = time.time() + 200, out / "metrics.jsonl"
    while process.poll() is None and time.time() < deadline and not (log.exists() and
                                                                      log.read_text().count("\n") >= 2):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # to torchrun alone, as a scheduler's preemption of the launcher
    _, stderr = process.communicate(timeout=200)
    step = len(metrics(out)) - 1
    assert 1 <= step < 5 and [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{step:06d}"], stderr[-3000:]
    again = shlex.join([*command[command.index("train_fsdp.py") + 1:], "--resume=true"])
    assert (f"stopped by SIGTERM (at step {step}, checkpoint {out / 'checkpoints' / f'step_{step:06d}'}); continue "
            f"with: torchrun --standalone --nproc_per_node=2 train_fsdp.py {again}\n") in stderr
    run(fsdp_command(out, runs / "cache", "--checkpoint_every=0", "--resume=true"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert [row["step"] for row in metrics(out)] == [0, 1, 2, 3, 4, 5]
    assert strip(metrics(out)) == strip(metrics(runs / "fsdp"))
    assert relative_weight_error(weights(runs / "fsdp"), weights(out)) == 0.0


def test_fsdp_relaunch_stops_every_rank_and_keeps_the_run_unless_overwrite(runs):
    """Relaunching the FSDP run's command (resume false) into a copy of its out_dir stops both ranks with exit code 2
    and one line naming --resume=true and --overwrite=true, leaving every file as it was; with --overwrite=true it
    starts over (earlier checkpoints removed, logs begun again from step 0)."""
    out = runs / "relaunched"
    shutil.copytree(runs / "fsdp", out)
    before = folder_state(out)
    lines = stopped_on_every_rank(out, runs / "cache", "--checkpoint_every=2").strip().splitlines()
    assert len(lines) == 1, lines  # nothing else: it stops before the models load
    assert lines[0].startswith(f"error: out_dir: {out} holds an earlier run (checkpoints, metrics.jsonl, ")
    assert "continue it with --resume=true" in lines[0] and "--overwrite=true" in lines[0]
    assert folder_state(out) == before
    again = run(fsdp_command(out, runs / "cache", "--max_steps=1", "--checkpoint_every=0", "--overwrite=true"))
    assert "resumed from" not in again.stdout and not (out / "checkpoints").exists()
    assert [row["step"] for row in metrics(out)] == [0, 1]


def test_fsdp_resume_without_a_checkpoint_says_it_starts_fresh(runs):
    """--resume=true into an out_dir without checkpoints: rank 0 prints one line saying it starts fresh, and it does."""
    out = runs / "resumed_from_nothing"
    result = run(fsdp_command(out, runs / "cache", "--max_steps=1", "--resume=true"))
    assert result.stdout.count(f"resume: no checkpoint in {out / 'checkpoints'}; starting fresh\n") == 1
    assert [row["step"] for row in metrics(out)] == [0, 1]


def test_fsdp_damaged_newest_checkpoint_falls_back_to_the_one_before(runs):
    """
    The module's FSDP run keeps its two checkpoints (steps 2 and 4, keep_checkpoints 2). With rank 1's shard file of
    step 4 cut in half, every rank fails that load (rank 0's shards load, partly restoring step 4) and all of them
    fall back to step 2 together: one warning line, then the run ends bitwise equal to the uninterrupted one, so the
    step-2 load overwrote all the failed one had applied, and the logs were cut back to step 2.
    """
    out = runs / "damaged"
    shutil.copytree(runs / "fsdp", out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    shard = out / "checkpoints" / "step_000004" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    result = run(fsdp_command(out, runs / "cache", "--checkpoint_every=2", "--resume=true"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: checkpoint {out / 'checkpoints' / 'step_000004'} cannot be loaded (") and warnings[0].endswith(
        "); trying the one before it"), result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000002'}" in result.stdout
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(metrics(out)) == strip(metrics(runs / "fsdp"))
    assert (out / "samples.jsonl").read_text() == (runs / "fsdp" / "samples.jsonl").read_text()
    assert relative_weight_error(weights(runs / "fsdp"), weights(out)) == 0.0


def test_fsdp_every_checkpoint_damaged_stops_every_rank_with_one_line(runs):
    """keep_checkpoints=2 keeps exactly the newest 2 of 3 saves (rank 0 removes the oldest); with a shard file of one
    truncated and the state.json of the other unreadable, --resume=true names each in a warning and stops both ranks
    with exit code 2 and one error line (no rank is left waiting in a collective), leaving the folder untouched."""
    out = runs / "all_damaged"
    run(fsdp_command(out, runs / "cache", "--max_steps=3", "--checkpoint_every=1", "--keep_checkpoints=2"))
    folders = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in folders] == ["step_000002", "step_000003"]
    shard = folders[0] / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    (folders[1] / "state.json").write_text('{"step": 3, "world')
    before = folder_state(out)
    stderr = stopped_on_every_rank(out, runs / "cache", "--max_steps=4", "--checkpoint_every=1", "--resume=true")
    lines = [line for line in stderr.splitlines() if line.startswith(("warning: ", "error: "))]  # not loading bars
    assert [line.split(" cannot be loaded")[0] for line in lines[:-1]] == [
        f"warning: checkpoint {p}" for p in reversed(folders)]
    assert lines[-1] == (f"error: resume: none of the 2 checkpoints in {out / 'checkpoints'} can be loaded (see the "
                         f"warnings above); to start over instead, --resume=false --overwrite=true")
    assert folder_state(out) == before


@pytest.fixture(scope="module")
def counts():
    """tests/_fsdp_counts.py's measurements (2 ranks): collectives of rollouts and of training steps."""
    result = run([*TORCHRUN, "--nproc_per_node=2", "tests/_fsdp_counts.py"])
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_rollout_all_gathers_do_not_grow_with_new_tokens(counts):
    """generate() all-gathers each FSDP unit once per rollout: as many for 32 new tokens as for 8."""
    assert counts["gathered_8"] == counts["gathered_32"] == counts["fsdp_units"] > 0
    assert counts["per_forward_32"] > counts["per_forward_8"]  # the count is sensitive: FSDP's default regathers


def test_gradients_are_reduced_once_per_step_not_per_micro_batch(counts):
    """With 2 micro-batches per rank, each student unit's gradients are reduce-scattered once per step (on the last
    micro-batch), not once per micro-batch."""
    assert counts["reduce_scatters"] == [counts["student_units"]] * 4


def test_sharded_teachers_forward_record_stays_bounded(counts):
    """FSDP2 clears a unit's record of forwards only in a backward; the frozen sharded teacher's record is cleared
    after each use, so it does not grow with the steps (it would by one entry per unit per forward)."""
    assert counts["teacher_record"] == [0, 0, 0, 0]


def test_no_view_tensor_warning_from_fsdp(counts):
    """The hidden-state loss path returns no view from an FSDP root (an in-place op on one would drop a hook)."""
    assert counts["view_warnings"] == 0
