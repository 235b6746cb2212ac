"""
Run bookkeeping that survives interruption and relaunching: folders written atomically, the complete checkpoints of
a run (the newest keep_checkpoints are kept), the refusal of a fresh run to delete an earlier run's checkpoints, the
logs (metrics.jsonl, samples.jsonl) cut back to a checkpoint and written row by row (RunLog), the summary, and
train_small.py's single-device checkpoint (train_fsdp.py writes sharded DCP ones). A run starts with
checkpoints_to_resume (before any model loads), then resume_from, then a RunLog.

A checkpoint is <out_dir>/checkpoints/step_XXXXXX. It is written to .tmp-step_XXXXXX and renamed only when complete,
so a run killed during a save resumes from the previous checkpoint, never from half a folder. A complete checkpoint
that is damaged later (a truncated file) fails to load, and the resume falls back to the one before it.
"""
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from distill import tracking


def save_atomically(path, write):
    """write(tmp) fills a temporary folder that is renamed to `path` only when complete."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def checkpoint_path(out_dir, step):
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(out_dir):
    """The complete checkpoints in out_dir, oldest first (temporary folders of an interrupted save are ignored)."""
    return sorted(path for path in (Path(out_dir) / "checkpoints").glob("step_*") if path.is_dir())


# What a run leaves in its out_dir (compare.py: a comparison's files and its per-run folders), and what marks it as
# finished. A run's progress.log (compare.py) is not among them: it is the log of whichever run writes next.
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "summary.json", "run_config.yaml", "student", "eval",
               "tensorboard", "wandb", "wandb_run_id", "comparison.json", "comparison.md", "comparison.png")
FINISHED = ("summary.json", "student", "eval", "comparison.json")
DISCARDED = ".overwritten"  # an overwrite moves the earlier run in here, then deletes it
PER_RUN_FOLDER = re.compile(r"\w+_seed\d+")  # compare.run_dir


def earlier_run(out_dir):
    """The names of what an earlier run left in out_dir ([] if nothing): its logs, summary, checkpoints, exported
    student and evaluations, a comparison's per-run folders, half-written files and an interrupted overwrite."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [name for name in RUN_ENTRIES if (out / name).exists()]
    found += sorted(path.name for path in out.iterdir() if path.name == DISCARDED or path.name.startswith(".tmp-")
                    or (PER_RUN_FOLDER.fullmatch(path.name) and path.is_dir() and earlier_run(path)))
    return found


def listed(entries):
    """What earlier_run found, as a message shows it: the first five names."""
    return ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")


def fresh_run_refused(out_dir, resume, overwrite):
    """
    The one-line reason a run must not start in out_dir, or None. A folder is claimed by one run: a fresh run into a
    folder that holds anything of an earlier one stops, unless overwrite (which deletes all of it) or resume (which
    continues it from its newest checkpoint) says otherwise. Relaunching a command must never destroy the run it
    started, and a new student must never sit beside the old one's evaluations. A resume with no checkpoint starts
    fresh only over an unfinished run's logs (a run killed before its first save: its steps are recomputed).
    """
    found, saved = earlier_run(out_dir), complete_checkpoints(out_dir)
    if not found or overwrite or (resume and (saved or not set(found) & set(FINISHED))):
        return None
    way = "continue it with --resume=true, or" if saved else "it has no checkpoint to continue from;"
    return (f"out_dir: {out_dir} holds an earlier run ({listed(found)}); {way} delete it as a whole with "
            f"--overwrite=true, or choose another out_dir")


def discard_earlier_run(out_dir):
    """Deletes everything of an earlier run in out_dir (earlier_run), as a whole: each entry is first renamed into
    out_dir/.overwritten, which is then deleted. An overwrite killed half-way leaves that folder, which still counts
    as the earlier run's (a fresh run refuses it) and the next overwrite deletes."""
    out = Path(out_dir)
    found = earlier_run(out)
    if not found:
        return
    bin_ = out / DISCARDED
    bin_.mkdir(exist_ok=True)
    for name in found:
        if name != DISCARDED:
            shutil.rmtree(bin_ / name, ignore_errors=True)
            os.replace(out / name, bin_ / name)
    shutil.rmtree(bin_)


def remove_older_checkpoints(out_dir, step, keep):
    """Keeps the checkpoint just saved at `step` and the keep - 1 complete ones before it. Any after it are removed:
    they are ones a resume could not load (it fell back to an older one), and this run recomputes their steps."""
    found = complete_checkpoints(out_dir)
    before = [path for path in found if path.name < f"step_{step:06d}"]
    for old in before[:max(len(before) - (keep - 1), 0)] + [path for path in found if path.name > f"step_{step:06d}"]:
        shutil.rmtree(old)


def read_log(path, upto_step):
    """The rows of a .jsonl log (metrics.jsonl, samples.jsonl) logged up to a checkpoint's step. Rows an interrupted
    run logged after its last save are dropped (they are recomputed), and so is a half-written last line (a kill in
    the middle of a write)."""
    if not Path(path).exists():
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    return [row for row in rows if row["step"] <= upto_step]


def write_atomically(path, text):
    """A file replaced by `text` in one rename: a kill at any moment leaves the old file or the new one."""
    tmp = Path(path).with_name(f".tmp-{Path(path).name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rewrite_log(path, rows):
    """A .jsonl log replaced by `rows`, atomically."""
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def save_checkpoint(out_dir, step, student, optimizer, keep):
    """Single device: the student (safetensors), AdamW's state, the step and the global RNG states (the rollout
    sampler needs none: each step's is seeded afresh, train_small.rollout_generator); only the newest `keep`
    checkpoints stay."""
    state = {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    save_atomically(checkpoint_path(out_dir, step), lambda tmp: (
        student.save_pretrained(tmp / "student"), torch.save(optimizer.state_dict(), tmp / "optimizer.pt"),
        torch.save(state, tmp / "state.pt")))
    remove_older_checkpoints(out_dir, step, keep)


def load_checkpoint(path, student, optimizer, trust_remote_code=False):
    """Single device: restores the student's weights and AdamW's state in place, and the RNG states; returns the step
    (the data position is a function of it). Every file is read before anything is restored, so a damaged file
    leaves the run's state as it was; and whatever a failed load did apply, the next checkpoint loaded overwrites
    (every weight, AdamW tensor and RNG state)."""
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(path / "student", dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    state = torch.load(path / "state.pt", weights_only=True)
    student.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"]


# ------------------------------------------------------------------------------------------------------------------
# Starting, resuming and logging a run (train_small.train). `runtime` is its hooks (train_small.SingleDevice or
# train_fsdp.FSDP): every decision that stops the run or picks its checkpoint is taken by all processes together.


def checkpoints_to_resume(cfg, runtime):
    """
    The complete checkpoints of out_dir to resume from, oldest first ([] for a fresh run), called before any model
    loads. A fresh run into an out_dir that holds anything of an earlier run stops with one line (fresh_run_refused),
    unless overwrite says so. Every rank reads out_dir (one shared folder) and they agree before any stops, tries a
    checkpoint or writes.
    """
    out = Path(cfg.out_dir)
    refused = fresh_run_refused(out, cfg.resume, cfg.overwrite)
    found = complete_checkpoints(out) if cfg.resume else []
    same = runtime.sum([len(found)])[0] == runtime.world * len(found)  # every rank sees as many checkpoints
    if not runtime.everywhere(refused is None and same):
        runtime.stop(refused or f"out_dir: the ranks see different checkpoints in {out} (it must be one folder "
                                f"that all of them share)")
    if cfg.resume and not found and runtime.is_main:
        print(f"resume: no checkpoint in {out / 'checkpoints'}; starting fresh"
              + (" (the logs an interrupted run left there are replaced)" if earlier_run(out) else ""))
    return found


class Interrupted(Exception):
    """Raised by train() when a signal stopped the run after a step: the signal, the step and the checkpoint saved
    there (None if the run stopped before its first step)."""

    def __init__(self, signum, step, checkpoint):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class Interruption:
    """
    SIGTERM (a preemption, a job's time limit; torchrun forwards it, and Ctrl-C's SIGINT, to every rank) and SIGINT
    during a run. The first one is recorded (`signal`) and the run goes on to the end of what it is doing; train()
    then saves a checkpoint after the step and stops (train_small.main prints how to resume). A second one exits at
    once, with 128 + its number. SIGUSR1 is compare.py's main process passing its own signal on to its workers (it
    records, but never counts as the second one). A second signal within a second of the first is the same request
    delivered twice (Slurm signals every process of a job, and torchrun passes its own signal on to its ranks), not
    a second one. Handlers are installed only in a process's main thread.
    """
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    SAME_REQUEST_S = 1.0

    def __init__(self, say=True, forward=None):
        self.signal, self.say, self.forward, self.previous, self.direct = None, say, forward, {}, 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        """Records the first signal; exits at once on a second SIGTERM or SIGINT. forward(signum, first), if given,
        passes each on (compare.py's main process to its workers)."""
        name = signal.Signals(signum).name
        repeated = self.direct and time.monotonic() - self.direct < self.SAME_REQUEST_S
        first = signum == signal.SIGUSR1 or not self.direct or repeated
        if self.forward is not None and not repeated:
            self.forward(signum, first)
        if not first:
            if self.say:
                print(f"\n{name} again: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if signum != signal.SIGUSR1 and not self.direct:
            self.direct = time.monotonic()
        if self.signal is None:
            self.signal = signal.SIGTERM if signum == signal.SIGUSR1 else signum
            if self.say:
                print(f"\n{name}: the run stops after the step in progress, with a checkpoint (send it again to "
                      f"exit at once)", file=sys.stderr, flush=True)


def first_line(error):
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def resume_from(found, student, optimizer, cfg, runtime):
    """
    (checkpoint, step): the newest of the complete checkpoints `found` that loads into the student, AdamW and the
    RNGs, or (None, 0) if there are none. One that fails to load (a truncated file, say) is named in a warning line
    and the one before it is tried; loading it overwrites whatever the failed load applied. Under FSDP every rank
    tries each checkpoint and the ranks move on together. If none loads the run stops: starting fresh instead would
    silently throw the run away.
    """
    for i in reversed(range(len(found))):
        try:
            step, problem = runtime.load_checkpoint(found[i], student, optimizer, cfg), None
        except Exception as error:  # any failure to read or apply it: damaged, truncated, of another model
            step, problem = 0, first_line(error)
        if runtime.everywhere(problem is None):
            if runtime.is_main:
                print(f"resumed from {found[i]}")
            return found[i], step
        if runtime.is_main:
            then = "trying the one before it" if i else "there is none before it"
            print(f"warning: checkpoint {found[i]} cannot be loaded ({problem or 'it failed on another rank'}); "
                  f"{then}", file=sys.stderr, flush=True)
    if found:
        runtime.stop(f"resume: none of the {len(found)} checkpoints in {found[0].parent} can be loaded (see the "
                     f"warnings above); to start over instead, --resume=false --overwrite=true")
    return None, 0


class RunLog:
    """
    metrics.jsonl (one row per step, and per evaluation) and samples.jsonl (the shown problems' completions) of a run,
    appended and flushed row by row, and the rows so far (history). Opened at the step the run starts from: a resumed
    run's logs are cut back to its checkpoint (rows logged after it, and a half-written line, are dropped: they are
    recomputed); a fresh run's out_dir is emptied of the earlier run (discard_earlier_run). Only the main process writes,
    and sends each row and the samples to the run's tracker (cfg.report_to, tracking.py), if any.
    """

    def __init__(self, out_dir, start, resumed, write, cfg=None):
        self.out, self.write = Path(out_dir), write
        self.history = read_log(self.out / "metrics.jsonl", start) if resumed and write else []
        self.metrics = self.tracker = None
        if write:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resumed:  # a fresh run: whatever an earlier run left here (allowed by overwrite) goes as a whole
                discard_earlier_run(self.out)
            rewrite_log(self.out / "metrics.jsonl", self.history)
            rewrite_log(self.out / "samples.jsonl", read_log(self.out / "samples.jsonl", start) if resumed else [])
            self.metrics = open(self.out / "metrics.jsonl", "a")
            if cfg is not None:  # the resolved config, every key: the run can be repeated from its folder alone
                write_atomically(self.out / "run_config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
                self.tracker = tracking.open_tracker(cfg.report_to, out_dir, start, resumed, cfg)

    def record(self, row):
        """One metrics row, also to the tracker (its numbers as scalars at its step); an evaluation's pass@1 is also
        printed."""
        self.history.append(row)
        if self.write:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            if self.tracker is not None:
                self.tracker.scalars(row["step"], tracking.scalars(row))
            if "pass@1" in row:
                tqdm.write(f"step {row['step']}: pass@1 {row['pass@1']:.3f} greedy {row['greedy']:.3f}")

    def samples(self, step, model_name, samples):
        """Appends one samples.jsonl row per shown problem, sends them to the tracker as a table and prints them, one
        line each."""
        if not (self.write and samples):
            return
        with open(self.out / "samples.jsonl", "a") as log:
            log.writelines(json.dumps({"step": step, "model": model_name, **s}) + "\n" for s in samples)
        if self.tracker is not None:
            self.tracker.samples(step, model_name, samples)
        tqdm.write(f"step {step}, {model_name}'s greedy completions (samples.jsonl):")
        for s in samples:
            verdict = "right" if s["correct"] else f"wrong (answer {s['answer']})"
            tqdm.write(f"  #{s['problem']} {one_line(s['question'], 40)} -> {one_line(s['completion'])}   {verdict}")

    def close(self):
        if self.metrics is not None:
            self.metrics.close()
        if self.tracker is not None:
            self.tracker.close()

    def write_summary(self, cfg, world_size, teacher_scores, started):
        """summary.json: the first, last and best evaluation, the teacher's scores, the wall time and the config."""
        evals = [row for row in self.history if "pass@1" in row]
        best = max(evals, key=lambda row: row["pass@1"])
        summary = {"method": cfg.method, "seed": cfg.seed, "steps": cfg.max_steps, "world_size": world_size,
                   "initial_pass@1": evals[0]["pass@1"], "final_pass@1": evals[-1]["pass@1"],
                   "final_greedy": evals[-1]["greedy"], "best_pass@1": best["pass@1"], "best_step": best["step"],
                   "teacher": teacher_scores, "wall_s": round(time.time() - started, 1),
                   "config": dataclasses.asdict(cfg)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))


def one_line(text, width=100):
    """text on one line (newlines shown as \\n), cut in the middle to at most `width` characters."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else f"{text[:width // 2 - 2]} .. {text[-(width // 2 - 2):]}"
