"""
Run bookkeeping that survives interruption and relaunching: folders written atomically, the complete checkpoints of
a run (the newest keep_checkpoints are kept), the refusal of a fresh run to delete an earlier run's checkpoints, the
logs (metrics.jsonl, samples.jsonl) cut back to a checkpoint, and train_small.py's single-device checkpoint
(train_fsdp.py writes sharded DCP ones).

A checkpoint is <out_dir>/checkpoints/step_XXXXXX. It is written to .tmp-step_XXXXXX and renamed only when complete,
so a run killed during a save resumes from the previous checkpoint, never from half a folder. A complete checkpoint
that is damaged later (a truncated file) fails to load, and the resume falls back to the one before it.
"""
import json
import os
import random
import shutil
from pathlib import Path

import torch


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


def fresh_run_refused(out_dir, resume, overwrite):
    """The one-line reason a run must not start in out_dir, or None: a fresh run (resume false) there would delete
    the checkpoints an earlier run left, and only overwrite true allows that (relaunching a command must not destroy
    the run it started)."""
    found = complete_checkpoints(out_dir)
    if resume or overwrite or not found:
        return None
    return (f"out_dir: {out_dir} holds an earlier run's checkpoints (newest {found[-1].name}); continue it with "
            f"--resume=true, or delete them and its logs with --overwrite=true")


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


def save_checkpoint(out_dir, step, student, optimizer, generator, keep):
    """Single device: the student (safetensors), AdamW's state, the step and every RNG state; only the newest `keep`
    checkpoints stay."""
    state = {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "sampler_rng": generator.get_state()}
    save_atomically(checkpoint_path(out_dir, step), lambda tmp: (
        student.save_pretrained(tmp / "student"), torch.save(optimizer.state_dict(), tmp / "optimizer.pt"),
        torch.save(state, tmp / "state.pt")))
    remove_older_checkpoints(out_dir, step, keep)


def load_checkpoint(path, student, optimizer, generator, trust_remote_code=False):
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
    generator.set_state(state["sampler_rng"])
    return state["step"]
