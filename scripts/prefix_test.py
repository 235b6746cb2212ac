"""
A direct test of TRB's premise, "more teacher-like prefixes give better supervision", on the embedded task. From one
initial student (the config's student_sft_steps and seed, loaded as training loads it: train_small.load) each arm runs
`updates` OPD updates, each exactly train_small.train_step (the loss is always E1, the reverse KL to the teacher on the
visited prefixes), with one thing changed: the rollouts come from a fixed budget eps (method fixed_eps, eps0 = the
arm's eps; 0 is OPD's own prefixes, inf the teacher's, beta = 1). Then each arm's student is measured on held-out
problems with the project's evaluation (distill.evaluation.evaluate, train_small.held_out_scores as its scorer): the
held-out reverse KL to the teacher on the student's own samples at eval_temperature (OPD's own objective, lower is
better), the log-likelihood of the reference solutions, greedy accuracy and pass@1. If better prefixes give better
supervision, an arm with eps > 0 should end with a lower held-out KL than eps 0 after the same number of updates.

    python -m scripts.prefix_test                                   # arms 0,inf; the default config, 32 repeats
    python -m scripts.prefix_test --student_sft_steps=100 --arms=0,0.169,inf --out=docs/results/prefix_test/strength100
    python -m scripts.prefix_test --student_sft_steps=50 --arms=0,0.339,inf --out=docs/results/prefix_test/strength50
    python -m scripts.prefix_test --arms=0,inf --updates=40 --repeats=8 --eval_problems=100 --samples=1 --seed=1

Options besides every config key: --arms=E,E,... (budgets eps >= 0, inf allowed, in the table's order; 0, the
reference of the paired differences, is put first where missing; default 0,inf), --updates=N (OPD updates per arm;
default 20), --repeats=N (paired repeats; default 32), --eval_problems=N (the first N held-out problems, at most
eval_size; default 200), --samples=N (sampled completions per held-out problem, on which pass@1 and the held-out KL are
taken; default 2) and --out=DIR (where prefix_test.md and prefix_test.json go; default runs/prefix_test).

The design is paired. Repeat r trains every arm on the prompts of training steps r*updates ... r*updates+updates-1
(train_small.train_questions), draws its rollouts from train_small.rollout_generator(seed + 1_000_003 * r, step, 0)
(so repeat 0 is training's own first `updates` steps, and every arm of a repeat gets the same noise), starts from a
copy of the same initial student with a fresh optimizer (train_small.make_optimizer), and evaluates with the same
seed. The lr schedule is training's, restarted in every arm: lr_warmup_steps is kept (10 of the 20 updates by default),
because the updates stand for a run's first steps, where TRB's warmup lies and the lr is still rising
(--lr_warmup_steps=0 takes the constant lr instead). The paired differences arm - eps 0 over repeats get 95%
intervals from distill.compare.paired_ci (Student's t) and a sentence from distill.compare.verdict.

Cost, on this project's 2-core CPU beside other jobs: an update takes ~0.35 s at eps 0 and ~0.5-0.6 s at eps > 0 (the
teacher decodes in lockstep, beta is solved per token), the evaluation ~2 s at 200 problems x 2 samples, so one arm of
a repeat ~12 s and the default 32 repeats ~7 min per arm, almost all of it training (arms 0,0.169,inf: 21 min). Nothing
is saved until the end: an interrupted test is simply rerun.
"""
import copy
import dataclasses
import hashlib
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

import train_small
from distill import compare, evaluation, models
from distill.config import die, load_config, positive_int, script_options, usage
from scripts import probe_budget

DEFAULTS = {"arms": "0,inf", "updates": "20", "repeats": "32", "eval_problems": "200", "samples": "2",
            "out": "runs/prefix_test"}
REPEAT_STRIDE = 1_000_003  # repeat r's rollout seed is seed + REPEAT_STRIDE * r
# The endpoints of an arm: (key, column title, whether higher is better), the held-out ones first.
ENDPOINTS = (("held_out_kl", "held-out KL", False), ("reference_logprob", "reference log-lik", True),
             ("greedy", "greedy acc", True), ("pass@1", "pass@1", True),
             ("teacher_logprob", "teacher log-prob (rollouts)", True), ("beta", "mean beta (rollouts)", None))


def options(argv):
    """(arms, updates, repeats, eval_problems, samples, out, the other arguments: the config's). An arm that is not a
    number >= 0, an empty list, or a count that is not a positive integer stops with one line naming the option."""
    found, rest = script_options(argv, DEFAULTS)
    counts = {name: positive_int(f"--{name}", found[name])
              for name in ("updates", "repeats", "eval_problems", "samples")}
    if not found["out"].strip():
        die("--out: empty (a folder for prefix_test.md and prefix_test.json)")
    return parse_arms(found["arms"]), *counts.values(), Path(found["out"]), rest


def parse_arms(text):
    """The arms' budgets in the order given, repeats kept (two equal arms are a check of the pairing), 0 first where
    missing."""
    arms = probe_budget.budgets(text, "--arms")
    return arms if 0.0 in arms else [0.0, *arms]


def arm_labels(arms):
    """How the tables name the arms: "eps 0 (OPD)" for the reference (the first 0), "eps inf (teacher)", "eps 0.169";
    a budget given twice gets "#2" on its second arm."""
    labels, reference = [], arms.index(0.0)
    for i, eps in enumerate(arms):
        label = f"eps {eps:g}" + (" (OPD)" if i == reference else " (teacher)" if eps == math.inf else "")
        seen = arms[:i].count(eps)
        labels.append(label + (f" #{seen + 1}" if seen else ""))
    return labels


def check_setting(cfg, eval_problems):
    """One line and exit where the test cannot run: a real dataset (held_out_kl needs the embedded task's full
    logits), the vLLM engine (one engine per arm and repeat) or more held-out problems than eval_size."""
    if cfg.dataset != "synthetic" or cfg.student != "synthetic":
        die("dataset: prefix_test runs on the embedded task (student, teacher and dataset synthetic): the held-out "
            "KL takes every token's full-vocabulary logits")
    if cfg.engine != "hf":
        die("engine: prefix_test decodes with the Hugging Face loop (engine hf): a vLLM engine would start anew for "
            "every arm of every repeat")
    if eval_problems > cfg.eval_size:
        die(f"--eval_problems: {eval_problems} is more than the {cfg.eval_size} held-out problems (eval_size)")


def arm_config(cfg, eps, repeat):
    """The config train_step reads in one arm of one repeat: rollouts at the fixed budget eps (method fixed_eps keeps
    eps0 at every step), their sampler seeded by seed + REPEAT_STRIDE * repeat, the only use train_step makes of
    cfg.seed: repeat 0 draws training's own noise, each repeat its own, every arm of a repeat the same."""
    return dataclasses.replace(cfg, method="fixed_eps", eps0=eps, seed=cfg.seed + REPEAT_STRIDE * repeat)


def fingerprint(values):
    """A short hash of a model's weights (a state dict) or of a list of prompts: the record that every arm of a
    repeat started from the same student and trained on the same prompts."""
    digest = hashlib.sha256()
    if isinstance(values, dict):
        for name, tensor in values.items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    else:
        digest.update(json.dumps(values).encode())
    return digest.hexdigest()[:16]


def measure(run, held_out, seed):
    """The student's held-out endpoints (pass@1, greedy, held_out_kl, reference_logprob), as train_small.evaluate_at
    takes them, with evaluation's generator seeded by `seed`."""
    scorer = lambda *args: train_small.held_out_scores(run, *args)  # noqa: E731
    return evaluation.evaluate(run.decoder, run.tokenizer, held_out, run.cfg, seed, run.runtime, scorer)


def run_arm(setup, initial, eps, repeat, batches, held_out):
    """One arm of one repeat: a copy of the initial student and a fresh optimizer, `len(batches)` train_step updates at
    budget eps, then the held-out endpoints; with the means over the updates of the rollouts' teacher log-prob, beta,
    realised KL and loss, and fingerprints of the start weights and the prompts."""
    cfg = arm_config(setup["cfg"], eps, repeat)
    student = copy.deepcopy(initial)
    start = fingerprint(student.state_dict())
    run = train_small.Run(cfg, setup["runtime"], setup["tokenizer"], student, setup["teacher"],
                          train_small.make_optimizer(student, cfg), setup["eos_ids"])
    run.decoder = train_small.make_decoder(run, 0)
    rows = [train_small.train_step(run, questions, step) for step, questions in enumerate(batches)]
    mean = lambda key: sum(row[key] for row in rows) / len(rows)  # noqa: E731 (a mean over updates, as compare's)
    record = {"eps": eps, **measure(run, held_out, cfg.seed + len(batches)),
              **{key: mean(key) for key in ("teacher_logprob", "beta", "realised_kl", "loss")},
              "start": start, "prompts": fingerprint(batches)}
    run.decoder.close()
    return record


def repeat_batches(train, cfg, repeat, updates):
    """The prompt batches of repeat r: those of training steps r*updates ... r*updates+updates-1."""
    return [train_small.train_questions(train, repeat * updates + u, cfg) for u in range(updates)]


def summarise(records, labels):
    """Per arm, each endpoint's mean and 95% interval over repeats; per arm other than the reference, the paired
    differences arm - reference per repeat, their mean and interval (compare.paired_ci) and its sentence
    (compare.verdict, which counts repeats where it says seeds)."""
    reference = labels[[row["eps"] for row in records[0]].index(0.0)]  # the first eps-0 arm
    per_arm = {label: [repeat[i] for repeat in records] for i, label in enumerate(labels)}
    out = {"arms": {}, "reference": reference}
    for label, rows in per_arm.items():
        arm = out["arms"][label] = {"eps": rows[0]["eps"]}
        for key, *_ in ENDPOINTS:
            arm[key] = compare.paired_ci([row[key] for row in rows])
        if label != reference:
            base = per_arm[reference]
            arm["vs_reference"] = {key: compare.paired_ci([a[key] - b[key] for a, b in zip(rows, base)])
                                   for key, *_ in ENDPOINTS if key != "beta"}
            arm["verdicts"] = {key: compare.verdict(f"{label} - {reference}, {title}", arm["vs_reference"][key])
                               .replace(" seeds", " repeats") for key, title, _ in ENDPOINTS if key != "beta"}
    return out


def cell(stat, sign=""):
    """mean [lo, hi], 3 decimals (4 for small values, where 3 would round the interval away)."""
    lo, hi = stat["ci95"]
    digits = 4 if max(abs(stat["mean"]), abs(lo), abs(hi)) < 0.1 else 3
    return f"{stat['mean']:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def report(summary, header, initial):
    """The markdown: the header lines, the per-arm table, the paired table and the verdicts."""
    arms = summary["arms"]
    titles = [title for _, title, _ in ENDPOINTS]
    lines = [*header, "", f"Initial student (every arm's start, measured once): held-out KL "
             f"{initial['held_out_kl']:.4f}, reference log-lik {initial['reference_logprob']:.3f}, greedy acc "
             f"{initial['greedy']:.3f}, pass@1 {initial['pass@1']:.3f}.", "",
             "Per arm after the updates: mean [95% CI] over repeats. Teacher log-prob and beta: means over the "
             "rollout tokens of the updates (the visited prefixes).", "",
             "| arm | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(arm[key]) for key, *_ in ENDPOINTS) + " |"
              for label, arm in arms.items()]
    paired = [(key, title) for key, title, better in ENDPOINTS if better is not None]
    lines += ["", f"Paired by repeat, arm - {summary['reference']}: mean [95% CI] (Student's t, n - 1 degrees of "
              "freedom). Held-out KL: negative = the arm's student is closer to the teacher on its own samples.", "",
              f"| arm - {summary['reference']} | " + " | ".join(title for _, title in paired) + " | repeats |",
              "|---" * (len(paired) + 2) + "|"]
    for label, arm in arms.items():
        if "vs_reference" in arm:
            stats = arm["vs_reference"]
            lines.append(f"| {label} | " + " | ".join(cell(stats[key], "+") for key, _ in paired) +
                         f" | {stats['held_out_kl']['n_seeds']} |")
    lines.append("")
    for arm in arms.values():
        lines += [f"- {arm['verdicts'][key]}." for key, _ in paired if "verdicts" in arm]
    return "\n".join(lines) + "\n"


def machine():
    """The machine line of the header: the CPU's model name (lscpu), the platform, torch's CPU threads, and the GPU
    where one ran the test. Timings, and (CPUs round differently) the per-repeat numbers, depend on it."""
    try:
        found = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in found.splitlines() if line.startswith("Model name")),
                   None)
    except (OSError, subprocess.SubprocessError):
        cpu = None
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu or platform.processor() or platform.machine()}, {platform.platform()}, "
            f"{torch.get_num_threads()} torch thread(s){gpu}")


def header_lines(command, cfg, arms, updates, repeats, eval_problems, samples, wall_s):
    """The markdown's first lines: the command, what was run, the machine and the wall time."""
    minutes, seconds = divmod(round(wall_s), 60)
    return [f"# Prefix test: {', '.join(f'eps {eps:g}' for eps in arms)} at student_sft_steps={cfg.student_sft_steps}",
            "", "```bash", command, "```", "",
            f"One initial student (student_sft_steps={cfg.student_sft_steps}, seed={cfg.seed}); per arm and repeat "
            f"{updates} OPD updates (train_small.train_step, reverse KL on the rollouts) from a copy of it, rollouts "
            f"at the arm's fixed budget eps (0: OPD's own prefixes; inf: the teacher's); {cfg.batch_size} prompts x "
            f"{cfg.rollouts_per_prompt} rollouts per update, lr {cfg.lr:g} with its cosine warmup over "
            f"{cfg.lr_warmup_steps} steps restarted in every arm; {repeats} repeats, paired (each its own prompts and "
            f"rollout noise, the same for every arm). Held-out: the first {eval_problems} problems, {samples} "
            f"samples each at T={cfg.eval_temperature} (pass@1, held-out KL) and greedy. Held-out KL is the student's "
            f"per-token reverse KL to the teacher on its own samples: OPD's own objective, lower is better. "
            f"Reference log-lik: its per-token log-likelihood of the held-out worked solutions.", "",
            f"Machine: {machine()}. Wall time {minutes}:{seconds:02d} "
            f"({datetime.now(timezone.utc).strftime('%Y-%m-%d')})."]


def main(argv):
    """[--arms=E,...] [--updates=N] [--repeats=N] [--eval_problems=N] [--samples=N] [--out=DIR] and the usual
    --config/--key=value arguments; returns everything written to prefix_test.json."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"{__doc__.strip()}\n\nThe config keys:\n{usage().split(chr(10), 2)[2]}")
        sys.exit(0)
    started = time.time()
    arms, updates, repeats, eval_problems, samples, out, rest = options(argv)
    cfg = load_config(rest)
    check_setting(cfg, eval_problems)
    from transformers.utils import logging
    logging.disable_progress_bar()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    command = shlex.join(["python", "-m", "scripts.prefix_test", *argv])
    print(f"{command}: arms {', '.join(f'{eps:g}' for eps in arms)}, {updates} updates, {repeats} repeats, "
          f"{eval_problems} held-out problems x {samples} samples", flush=True)
    runtime = train_small.SingleDevice()
    tokenizer, train, held_out, initial, teacher, _ = train_small.load(cfg, runtime)
    held_out = held_out.select(range(eval_problems))
    cfg = dataclasses.replace(cfg, eval_samples=samples)  # after load: the teacher's cached scores keep theirs
    setup = {"cfg": cfg, "runtime": runtime, "tokenizer": tokenizer, "teacher": teacher,
             "eos_ids": models.stop_token_ids(tokenizer, initial, teacher)}
    labels = arm_labels(arms)
    before = train_small.Run(cfg, runtime, tokenizer, initial, teacher, None, setup["eos_ids"])
    before.decoder = train_small.make_decoder(before, 0)
    initial_scores = measure(before, held_out, cfg.seed)  # training's step-0 evaluation seed
    records = []
    bar = tqdm(range(repeats), desc=f"prefix test ({len(arms)} arms x {updates} updates)")
    for repeat in bar:
        batches = repeat_batches(train, cfg, repeat, updates)
        records.append([run_arm(setup, initial, eps, repeat, batches, held_out) for eps in arms])
        bar.set_postfix(kl=" ".join(f"{r['held_out_kl']:.3f}" for r in records[-1]))
    summary = summarise(records, labels)
    wall_s = time.time() - started
    text = report(summary, header_lines(command, cfg, arms, updates, repeats, eval_problems, samples, wall_s),
                  initial_scores)
    results = {"command": command, "machine": machine(), "wall_s": round(wall_s, 1), "arms": arms, "labels": labels,
               "updates": updates, "repeats": repeats, "eval_problems": eval_problems, "samples": samples,
               "initial": initial_scores, **summary,
               "per_repeat": [{label: row for label, row in zip(labels, repeat)} for repeat in records],
               "config": dataclasses.asdict(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_test.md").write_text(text)
    (out / "prefix_test.json").write_text(json.dumps(results, indent=2))
    print(text)
    print(f"wrote {out / 'prefix_test.md'} (the tables above) and {out / 'prefix_test.json'} (every number, per "
          f"repeat)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
