"""
`python train_small.py --compare=opd,trb,... --seeds=0,...,7`: the paper's comparison of behavior policies, repeated
over seeds and paired by seed. An arm is a method with its own overrides (`trb:eps0=inf:lr=0.001`, config.arm_config).
Every arm trains from the same teacher and, per seed, the same student init, data order, evaluation problems and
rollout noise, so an arm's difference to the OPD arm is taken seed by seed and reported with a 95% confidence interval
(Student's t over the paired differences): on the embedded task first for the continuous endpoints (held-out reverse
KL to the teacher, reference solutions' log-likelihood), then for the final pass@1 and the area under the pass@1
curve (the mean over evaluations, less noisy than one point). Results go to out_dir as comparison.json,
comparison.md (the tables, then one held-out problem as each method's student finally writes it) and comparison.png
(pass@1 against step with confidence bands, the paired difference to OPD, the budget and mean beta, the teacher
log-prob of the rollouts). Runs go compare_workers at a time, each in its own process. Relaunched with --resume=true,
finished runs are read back, an interrupted one continues from its checkpoint and the others start; without it, a
comparison whose runs left checkpoints stops at once, before any run starts (--overwrite=true starts every run over).
"""
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import signal
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from tqdm import tqdm

from distill import checkpoints, math_data, models
from distill.config import arm_config, arm_label, die


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom: bisection on its CDF, whose density is
    integrated by Simpson's rule (exact to ~1e-9 here; e.g. 12.706 at df = 1, 2.365 at df = 7, 1.960 as df -> inf)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x, n=2000):  # P(T <= x) for x >= 0: 1/2 + the integral of the density over [0, x]
        h = x / n
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return 0.5 + h / 3 * (density(0) + inner + density(x))

    lo, hi = 0.0, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_ci(differences):
    """Mean of per-seed paired differences with its 95% confidence interval (t with n - 1 degrees of freedom):
    {"mean", "ci95": [lo, hi], "n_seeds"}. One seed has no interval (NaN bounds)."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return {"mean": mean, "ci95": [math.nan, math.nan], "n_seeds": n}
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n_seeds": n}


def verdict(name, stat):
    """One sentence that claims only what the interval shows."""
    lo, hi = stat["ci95"]
    text = f"{name} = {stat['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    if not lo <= hi:
        return f"{text}, one seed: no interval"
    if lo > 0 or hi < 0:
        return f"{text}, significant at {stat['n_seeds']} seeds (the 95% interval excludes 0)"
    return f"{text}, not significant at {stat['n_seeds']} seeds"


def run_dir(out_dir, arm, seed):
    """One arm's run of one seed: <out_dir>/<arm>_seed<n>, the arm's colons as underscores (trb_eps0=inf_seed0)."""
    return Path(out_dir) / f"{arm.replace(':', '_')}_seed{seed}"


def reference_arm(arm_cfgs):
    """The arm the others are paired against: the first whose method is OPD, or None."""
    return next((arm for arm, arm_cfg in arm_cfgs.items() if arm_cfg.method == "opd"), None)


def finished(run_cfg):
    """With --resume=true, the metrics history of a run that finished earlier (it has its summary.json), else None."""
    out = Path(run_cfg.out_dir)
    if run_cfg.resume and (out / "summary.json").exists():
        return [json.loads(line) for line in open(out / "metrics.jsonl")]
    return None


_worker = {"stop": None, "stopped": False}  # a compare worker's stop request (_start_worker) and whether it stopped


def _start_worker(stop):
    """A compare worker between runs: Ctrl-C's SIGINT and SIGUSR1 are the main process's to handle (it sets `stop`, an
    Event, and passes them on to the runs in progress, whose train() handles them); SIGTERM keeps its default, which
    is how the pool ends idle workers."""
    _worker["stop"] = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _run(train, run_cfg):
    """One method-seed run, train(run_cfg), in a worker process: its metrics history, "interrupted" if a signal stopped
    it (or came before it started), None if it stopped on an error; its bars and prints go to the run's own
    progress.log (several runs at once would interleave on screen)."""
    history = finished(run_cfg)
    if history is not None:
        return history
    if _worker["stopped"] or (_worker["stop"] is not None and _worker["stop"].is_set()):
        return "interrupted"
    if run_cfg.num_threads:
        torch.set_num_threads(run_cfg.num_threads)
    Path(run_cfg.out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_cfg.out_dir) / "progress.log", "a") as log, redirect_stderr(log), redirect_stdout(log):
        try:
            return train(run_cfg)
        except checkpoints.Interrupted:
            _worker["stopped"] = True
            return "interrupted"
        except SystemExit:  # a run that stops (config.die) said why in its log; a worker exiting would hang the pool
            return None


def _pass_on(stop):
    """The main process's signal handler's forward (checkpoints.Interruption): the first signal sets `stop` (no new run
    starts) and sends SIGUSR1 to the workers, which asks a run in progress to stop after its step (a Ctrl-C reaches
    them too; SIGUSR1 never counts as a second signal); a second signal kills them, as the main process exits."""
    def forward(signum, first):
        if first:
            stop.set()
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGUSR1 if first else signal.SIGKILL)
    return forward


def _prepare(score, run_cfg):
    """Train and cache one seed's student init (and load the cached teacher) in a worker process."""
    if run_cfg.num_threads:
        torch.set_num_threads(run_cfg.num_threads)
    with open(os.devnull, "w") as quiet, redirect_stderr(quiet), redirect_stdout(quiet):
        models.load_models(run_cfg, *math_data.load_run_splits(run_cfg), score=score)


def compare(cfg, train, score):
    """Every arm of cfg.compare (a method and its own overrides, config.arm_config) for every seed in cfg.seeds (same
    teacher, same per-seed student init), each run by train(run_cfg) -> its metrics history, compare_workers at a
    time; writes comparison.{json,md,png} to out_dir. score: how models.load_models scores the embedded teacher,
    once, when the runs are prepared in parallel."""
    methods, seeds = cfg.compare.split(","), [int(s) for s in cfg.seeds.split(",")]
    started = time.time()
    arm_cfgs = {m: arm_config(cfg, m) for m in methods}
    configs = {(m, s): dataclasses.replace(arm_cfgs[m], seed=s, compare="", out_dir=str(run_dir(cfg.out_dir, m, s)))
               for s in seeds for m in methods}
    out = Path(cfg.out_dir)
    earlier = checkpoints.earlier_run(out)  # the comparison's files and its per-run folders, checked before any run
    if earlier and not (cfg.resume or cfg.overwrite):
        die(f"compare: out_dir: {out} holds an earlier comparison ({checkpoints.listed(earlier)}); continue it with "
            f"--resume=true (finished runs are read back, interrupted ones continue), delete it as a whole with "
            f"--overwrite=true, or choose another out_dir")
    if cfg.overwrite and not cfg.resume:
        checkpoints.discard_earlier_run(out)
    for run_cfg in configs.values():  # before any run starts (each would refuse on its own, after others trained)
        refused = None if finished(run_cfg) else checkpoints.fresh_run_refused(run_cfg.out_dir, run_cfg.resume,
                                                                                run_cfg.overwrite)
        if refused:
            die(f"compare: {refused}")
    workers = min(cfg.compare_workers, len(configs))
    if workers <= 1:
        runs = {key: finished(run_cfg) or train(run_cfg) for key, run_cfg in configs.items()}
    else:
        # The teacher is trained and cached here, then each seed's student init by one worker, then the runs share
        # them (two workers never train the same model at once).
        models.load_models(cfg, *math_data.load_run_splits(cfg), score=score)
        spawn = multiprocessing.get_context("spawn")
        stop = spawn.Event()
        with checkpoints.Interruption(forward=_pass_on(stop)) as interruption, \
                spawn.Pool(workers, initializer=_start_worker, initargs=(stop,)) as pool:
            pool.map(functools.partial(_prepare, score), [configs[(methods[0], s)] for s in seeds])
            results = pool.imap(functools.partial(_run, train), configs.values())
            runs = dict(zip(configs, tqdm(results, total=len(configs), desc=f"compare ({workers} runs at a time)")))
            pool.close()
            pool.join()  # workers that exit by themselves free what they hold (a SIGTERM from terminate() would not)
        signalled = interruption.signal
        del stop, interruption  # the Event's semaphore is freed here (an exit holding it warns of a leak)
        if signalled or any(history == "interrupted" for history in runs.values()):
            raise checkpoints.Interrupted(signalled or signal.SIGTERM, None, None)
        for key, history in runs.items():
            if history is None:
                said = (Path(configs[key].out_dir) / "progress.log").read_text().strip().splitlines() or ["?"]
                die(f"compare: the run in {configs[key].out_dir} stopped: {said[-1].removeprefix('error: ')}")
    runs = {m: [runs[(m, s)] for s in seeds] for m in methods}
    results = summarise(runs, seeds, arm_cfgs)
    results["wall_s"] = round(time.time() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    text = report(results, cfg) + example(out, methods, seeds[0], arm_cfgs)
    (out / "comparison.md").write_text(text)
    plot_comparison(runs, out / "comparison.png", arm_cfgs)
    print(text)
    print(f"wrote {out / 'comparison.md'} (the tables above), {out / 'comparison.json'} (every number, per seed) and "
          f"{out / 'comparison.png'} (the curves); each run's logs, summary and student are in {out}/<method>_seed<n>/")
    return results


# The paired endpoints, continuous ones first: (key, column title, metric of an evaluation row, over which evaluations)
ENDPOINTS = (("final_kl", "held-out KL (final)", "held_out_kl", "final"),
             ("mean_kl", "held-out KL (mean)", "held_out_kl", "mean"),
             ("final_ref", "reference log-lik (final)", "reference_logprob", "final"),
             ("final", "final pass@1", "pass@1", "final"),
             ("auc", "AUC", "pass@1", "mean"))


def summarise(runs, seeds, arm_cfgs):
    """
    Per arm: per-seed final and best pass@1, AUC (mean pass@1 over evaluations), final greedy accuracy, where the runs
    logged them (the embedded task) the held-out reverse KL to the teacher and the reference solutions' log-likelihood
    (final; the KL also as its mean over evaluations), the teacher log-prob of warmup rollouts; per arm other than
    the reference (the first OPD arm), the paired differences to it, per endpoint.
    """
    results = {"methods": {}, "seeds": seeds}
    for m, histories in runs.items():
        evals = [[row for row in h if "pass@1" in row] for h in histories]
        warm = [r["teacher_logprob"] for h in histories for r in h if 0 < r["step"] <= arm_cfgs[m].warmup_steps]
        row = results["methods"][m] = {
            "label": arm_label(arm_cfgs[m], m),
            "best": [max(r["pass@1"] for r in e) for e in evals], "final_greedy": [e[-1]["greedy"] for e in evals],
            "initial": [e[0]["pass@1"] for e in evals],
            "teacher_logprob_warmup": sum(warm) / len(warm) if warm else None}
        for key, _, metric, over in ENDPOINTS:
            if all(metric in r for e in evals for r in e):
                row[key] = [e[-1][metric] if over == "final" else sum(r[metric] for r in e) / len(e) for e in evals]
    reference = reference_arm(arm_cfgs)
    if reference is not None:
        base = results["methods"][reference]
        for m, r in results["methods"].items():
            if m != reference:
                r["vs_opd"] = {key: paired_ci([a - b for a, b in zip(r[key], base[key])])
                               for key, *_ in ENDPOINTS if key in r and key in base}
    return results


def report(results, cfg):
    """comparison.md: per-arm means with 95% intervals, the paired differences to the OPD arm (continuous endpoints
    first), and what they show."""
    def cell(xs):
        stat = paired_ci(xs)  # the interval of a mean is the paired one against 0
        return f"{stat['mean']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]"

    def signed(stat):
        return f"{stat['mean']:+.3f} [{stat['ci95'][0]:+.3f}, {stat['ci95'][1]:+.3f}]"

    seeds, arms = results["seeds"], results["methods"]
    shown = [(key, title) for key, title, *_ in ENDPOINTS if all(key in r for r in arms.values())]
    lines = [f"Held-out endpoints over {len(seeds)} seeds ({cfg.seeds}): mean [95% CI]. Held-out KL: the student's "
             f"per-token reverse KL to the teacher on its own samples of the held-out problems (OPD's objective, "
             f"lower is better); reference log-lik: its per-token log-likelihood of the held-out worked solutions "
             f"(higher is better); AUC = mean pass@1 over the evaluations (every {cfg.eval_every} steps and at the "
             f"end; "
             f"{cfg.eval_size} problems x {cfg.eval_samples} samples at T={cfg.eval_temperature}). {cfg.max_steps} "
             f"steps, eps0={cfg.eps0}, warmup_steps={cfg.warmup_steps}, student_sft_steps={cfg.student_sft_steps} "
             f"(an arm's own overrides in its name). Wall time {results.get('wall_s', math.nan) / 60:.1f} min.", "",
             "| arm | " + " | ".join(title for _, title in shown) + " | best pass@1 | final greedy | teacher log-prob "
             "(warmup) |", "|---" * (len(shown) + 4) + "|"]
    for r in arms.values():
        logprob = r["teacher_logprob_warmup"]
        lines.append(f"| {r['label']} | " + " | ".join(cell(r[key]) for key, _ in shown) +
                     f" | {cell(r['best'])} | {cell(r['final_greedy'])} | "
                     f"{'-' if logprob is None else f'{logprob:.3f}'} |")
    initial = next(iter(arms.values()))["initial"]
    lines += ["", f"Initial student pass@1 (the same for every arm): {cell(initial)}."]
    paired = [(r["label"], r["vs_opd"]) for r in arms.values() if "vs_opd" in r]  # a list: labels may repeat
    if paired:
        keys = [(key, title) for key, title in shown if all(key in stats for _, stats in paired)]
        lines += ["", "Paired by seed, arm - OPD: mean [95% CI] (Student's t, n - 1 degrees of freedom)", "",
                  "| arm - opd | " + " | ".join(title for _, title in keys) + " | seeds |",
                  "|---" * (len(keys) + 2) + "|"]
        for label, stats in paired:
            lines.append(f"| {label} | " + " | ".join(signed(stats[key]) for key, _ in keys) +
                         f" | {stats['final']['n_seeds']} |")
        lines.append("")
        for label, stats in paired:
            lines.append(f"- {label} - opd: " + "; ".join(verdict(title, stats[key]) for key, title in keys) + ".")
    return "\n".join(lines) + "\n"


def example(out, methods, seed, arm_cfgs):
    """Held-out problem 0 as the runs of one seed left it (from their samples.jsonl): the teacher's greedy completion,
    the initial student's (the same for every arm) and each arm's final one; "" without samples."""
    logs = {m: run_dir(out, m, seed) / "samples.jsonl" for m in methods}
    if not all(path.exists() for path in logs.values()):
        return ""
    rows = {m: [r for r in map(json.loads, open(path)) if r["problem"] == 0] for m, path in logs.items()}
    teacher = [r for r in rows[methods[0]] if r["model"] == "teacher"]
    student = {m: [r for r in rows[m] if r["model"] == "student"] for m in methods}  # in step order
    if not teacher or not all(student.values()):
        return ""
    shown = [("teacher", teacher[0]), ("student, step 0", student[methods[0]][0])]
    shown += [(f"{arm_label(arm_cfgs[m], m)}, step {student[m][-1]['step']}", student[m][-1]) for m in methods]
    lines = [f"\nHeld-out problem 0, greedy, seed {seed}: {teacher[0]['question'].strip()} "
             f"(answer {teacher[0]['answer']})", "```text"]
    for label, row in shown:
        completion = json.dumps(row["completion"])[1:-1]  # one line: newlines escaped
        completion = completion if len(completion) <= 100 else "..." + completion[-97:]  # the end holds the answer
        lines.append(f"{label:24s} {'right' if row['correct'] else 'wrong'}  {completion}")
    return "\n".join(lines + ["```", ""])


def plot_comparison(runs, path, arm_cfgs):
    """pass@1 vs step (mean over seeds, 95% confidence band); the paired difference to the OPD arm (mean, 95% band);
    eps and mean beta; teacher log-prob of rollouts; and where the runs logged it, the held-out reverse KL to the
    teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with_kl = all("held_out_kl" in row for hs in runs.values() for h in hs for row in h if "pass@1" in row)
    fig, axes = plt.subplots(1, 5 if with_kl else 4, figsize=(26 if with_kl else 21, 4.5))
    beta_axis = axes[2].twinx()  # eps ~ 1e-2 and beta in [0, 1] need their own scales
    evaluated = lambda metric: {m: torch.tensor([[row[metric] for row in h if "pass@1" in row] for h in hs],
                                                dtype=torch.float64) for m, hs in runs.items()}  # (seeds, evaluations)
    curves, reference = evaluated("pass@1"), reference_arm(arm_cfgs)

    def band(ax, steps, x, color, label):  # mean over seeds and its 95% t interval, per evaluation
        n = x.shape[0]
        mean = x.mean(0)
        half = t_quantile(0.975, n - 1) * x.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
        ax.plot(steps, mean, color=color, marker="o", label=label)
        ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.2)

    for i, (m, histories) in enumerate(runs.items()):
        color, label = f"C{i}", arm_label(arm_cfgs[m], m)
        steps = [row["step"] for row in histories[0] if "pass@1" in row]
        band(axes[0], steps, curves[m], color, label)
        if reference is not None and m != reference:
            band(axes[1], steps, curves[m] - curves[reference], color, f"{label} - opd")
        if with_kl:
            band(axes[4], steps, evaluated("held_out_kl")[m], color, label)
        rows = [row for row in histories[0] if "loss" in row]
        train_steps = [r["step"] for r in rows]
        axes[2].plot(train_steps, [min(r["eps"], 1e3) for r in rows], color=color, label=label)  # inf drawn at 1e3
        beta = torch.tensor([[r["beta"] for r in h if "loss" in r] for h in histories]).mean(0)  # (steps,)
        beta_axis.plot(train_steps, beta, color=color, linestyle="--")
        logprob = torch.tensor([[r["teacher_logprob"] for r in h if "loss" in r] for h in histories]).mean(0)
        axes[3].plot(train_steps, logprob, color=color, label=label)
    n = len(next(iter(runs.values())))
    axes[0].set(xlabel="step", ylabel="held-out pass@1", title=f"pass@1, mean over {n} seeds, 95% CI band")
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set(xlabel="step", ylabel="pass@1 difference", title="paired by seed: arm - opd, 95% CI band")
    axes[2].set_yscale("symlog", linthresh=1e-3)
    axes[2].set(xlabel="step", ylabel="KL budget eps (solid)",
                title="KL budget (solid, inf at 1e3) and mean beta (dashed)")
    beta_axis.set(ylabel="mean beta over rollout tokens (dashed)", ylim=(-0.02, 1.02))
    axes[3].set(xlabel="step", ylabel="mean log pi_T(sampled token)", title="teacher log-prob of rollout tokens")
    if with_kl:
        axes[4].set(xlabel="step", ylabel="KL(student || teacher) per token",
                    title="held-out reverse KL on the student's samples, 95% CI band")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
