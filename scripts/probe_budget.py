"""
The KL budget eps on a task's own scale. The paper's grid {0.005, 0.02, 0.05} is set for Qwen3's 151,936 tokens; the
embedded task has 18 and a nearly deterministic teacher, so what an eps does to its rollouts is measured here: for each
eps of a grid this samples the rollouts of training's step 0 (its student init, teacher, first prompts and sampler seed,
so that eps is the only difference) with trb.blended_generate, and prints per eps the mean beta, realised KL(mu || pi_S)
and teacher log-prob of the sampled tokens (means over completion tokens), the rate of correct rollouts and the mean
completion length. It then names the eps that closes half of the teacher log-prob gap between OPD's rollouts (eps 0) and
the teacher's own (eps inf, beta = 1): the grid interval where the mean first reaches the midpoint, and an estimate by
linear interpolation in log eps inside it.

    python -m scripts.probe_budget                                  # the default config: student_sft_steps 200
    python -m scripts.probe_budget --student_sft_steps=50           # a weaker student init
    python -m scripts.probe_budget --eps_grid=0,0.02,0.2,2,inf --rows=16 --seed=1

Options besides every config key: --eps_grid=E,E,... (comma-separated numbers >= 0, inf allowed; default
0,0.005,0.02,0.05,0.1,0.2,0.5,1,2,5,inf; 0 and inf, the two ends of the gap, are added where missing) and --rows=N
(rollouts per eps; default batch_size * rollouts_per_prompt, one training step's).
The teacher log-prob is training's metric (metrics.jsonl's teacher_logprob): a teacher forward on the sampled
sequences, which also gives it at eps 0, where the rollout never runs the teacher.
"""
import dataclasses
import math
import shlex
import sys

import torch

import train_small
import trb
from distill import evaluation, math_data, models
from distill.config import die, load_config, positive_int, script_options, usage

DEFAULT_GRID = "0,0.005,0.02,0.05,0.1,0.2,0.5,1,2,5,inf"


def options(argv):
    """(eps grid ascending, rows or None, the other arguments: the config's). A grid value that is not a number >= 0,
    an empty grid or rows that are not a positive integer stop with one line naming the option."""
    found, rest = script_options(argv, {"eps_grid": DEFAULT_GRID, "rows": None})
    grid = {0.0, math.inf, *budgets(found["eps_grid"], "--eps_grid")}
    rows = None if found["rows"] is None else positive_int("--rows", found["rows"])
    return sorted(grid), rows, rest


def budgets(text, option):
    """The comma-separated budgets eps >= 0 (inf allowed) of an option, in the order given; an empty list, a word that
    is not a number or a negative one (NaN included) stops with one line naming the option."""
    if not text.strip():
        die(f"{option}: empty (comma-separated numbers >= 0, inf allowed)")
    found = []
    for word in text.split(","):
        try:
            eps = float(word)
        except ValueError:
            die(f"{option}: {word!r} is not a number (comma-separated numbers >= 0, inf allowed)")
        if not eps >= 0:  # NaN included
            die(f"{option}: {word!r} must be >= 0 (inf allowed)")
        found.append(eps + 0.0)  # -0 is 0
    return found


def step0_questions(train, cfg, rows):
    """rows questions: the data order's first prompts (step 0's batch first, as train_small.train_questions picks
    them), each repeated rollouts_per_prompt times as a training step does."""
    prompts = -(-rows // cfg.rollouts_per_prompt)
    questions = train_small.train_questions(train, 0, dataclasses.replace(cfg, batch_size=prompts))
    return [q for q in questions for _ in range(cfg.rollouts_per_prompt)][:rows]


@torch.no_grad()
def probe(student, teacher, tokenizer, cfg, eos_ids, questions, answers, eps):
    """One table row: rollouts at budget eps from training's step-0 sampler seed, their means and correct rate."""
    device, V = next(student.parameters()).device, len(tokenizer)
    prompts = [math_data.format_prompt(q, tokenizer, cfg) for q in questions]
    input_ids, mask = math_data.encode_prompts(prompts, tokenizer, device)  # (B, P)
    P = input_ids.shape[1]
    generator = train_small.rollout_generator(cfg.seed, 0, 0, device)  # training's step-0 sampler
    with models.autocast(cfg):
        rollout = trb.blended_generate(student, teacher, input_ids, mask, eps=eps, temperature=cfg.temperature,
                                       max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids,
                                       pad_token_id=tokenizer.pad_token_id, vocab_size=V, generator=generator)
        full_mask = torch.cat([mask, rollout.completion_mask.long()], 1)  # (B, P+N)
        logits = train_small.forward_completions(teacher, rollout.sequences, full_mask, P, V, hidden=False)
    tokens = rollout.sequences[:, P:]  # (B, N)
    logprob, _ = train_small.teacher_view_sums(trb.canonicalise_eos(logits, eos_ids), tokens, rollout.completion_mask)
    stats = evaluation.rollout_stats(rollout)
    texts = tokenizer.batch_decode([row[keep].tolist() for row, keep in zip(tokens, rollout.completion_mask)],
                                   skip_special_tokens=True)
    exact = cfg.dataset == "synthetic"
    correct = [math_data.is_correct(t, answers[q], exact) for t, q in zip(texts, questions) if q in answers]
    return {"eps": eps, "beta": stats["beta"], "realised_kl": stats["realised_kl"],
            "teacher_logprob": logprob / stats["completion_tokens"],
            "correct": sum(correct) / len(correct) if correct else math.nan,
            "length": stats["completion_tokens"] / len(questions)}


def half_gap(table):
    """(target, (lo, hi), estimate, line): the midpoint of the teacher log-probs at eps 0 and inf, the first grid
    interval whose ends straddle it (lp(lo) < target <= lp(hi), hi finite), the eps where the line through the two
    points in (log eps, log-prob) meets it (None where lo is 0), and the line that reports it."""
    lp = {row["eps"]: row["teacher_logprob"] for row in table}
    target = (lp[0.0] + lp[math.inf]) / 2
    if not lp[math.inf] > lp[0.0]:
        return target, None, None, (f"no gap to close: the teacher log-prob at eps inf ({lp[math.inf]:.3f}) is not "
                                    f"above eps 0's ({lp[0.0]:.3f})")
    finite = sorted(eps for eps in lp if math.isfinite(eps))
    for lo, hi in zip(finite, finite[1:]):
        if lp[lo] < target <= lp[hi]:
            if lo == 0:
                return target, (lo, hi), None, (f"half the gap (teacher log-prob {target:.3f}) closes by eps {hi:g}, "
                                                f"the grid's first eps above 0: add smaller ones to place it")
            share = (target - lp[lo]) / (lp[hi] - lp[lo])
            estimate = math.exp(math.log(lo) + share * (math.log(hi) - math.log(lo)))
            return target, (lo, hi), estimate, (f"half the gap (teacher log-prob {target:.3f}) closes at eps in "
                                                f"({lo:g}, {hi:g}]: ~{estimate:.3g} by linear interpolation in log eps")
    return target, None, None, (f"no finite eps of the grid reaches half the gap (teacher log-prob {target:.3f}; "
                                f"eps {finite[-1]:g} gives {lp[finite[-1]]:.3f})")


def main(argv):
    """[--eps_grid=E,E,...] [--rows=N] and the usual --config/--key=value arguments; returns the numbers printed."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"{__doc__.strip()}\n\nThe config keys:\n{usage().split(chr(10), 2)[2]}")
        sys.exit(0)
    grid, rows, rest = options(argv)
    cfg = load_config(rest)
    rows = rows or cfg.batch_size * cfg.rollouts_per_prompt
    from transformers.utils import logging
    logging.disable_progress_bar()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    command = shlex.join(["python", "-m", "scripts.probe_budget", *argv])
    strength = f"student_sft_steps={cfg.student_sft_steps}" if cfg.student == "synthetic" else f"student={cfg.student}"
    print(f"{command}: {strength}, seed={cfg.seed}, rows={rows} (the first {-(-rows // cfg.rollouts_per_prompt)} "
          f"training prompts x {cfg.rollouts_per_prompt}), temperature={cfg.temperature}", flush=True)
    tokenizer, train, _, student, teacher, _ = train_small.load(cfg, train_small.SingleDevice())
    student.eval()
    eos_ids = models.stop_token_ids(tokenizer, student, teacher)
    questions = step0_questions(train, cfg, rows)
    answers = dict(zip(train["question"], train["answer"])) if "answer" in train.column_names else {}
    print(f"{'eps':>8} {'beta':>7} {'realised KL':>12} {'teacher logp':>13} {'correct':>8} {'length':>7}")
    table = []
    for eps in grid:
        table.append(probe(student, teacher, tokenizer, cfg, eos_ids, questions, answers, eps))
        r = table[-1]
        print(f"{eps:>8g} {r['beta']:>7.4f} {r['realised_kl']:>12.4f} {r['teacher_logprob']:>13.4f} "
              f"{r['correct']:>8.3f} {r['length']:>7.2f}", flush=True)
    target, interval, estimate, line = half_gap(table)
    print(line)
    return {"command": command, "strength": strength, "seed": cfg.seed, "rows": rows, "grid": grid, "table": table,
            "target": target, "interval": interval, "estimate": estimate, "line": line}


if __name__ == "__main__":
    main(sys.argv[1:])
