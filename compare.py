"""
`python train_small.py --compare=opd,trb,... --seeds=0,1,2`: the paper's comparison of behavior policies, repeated
over seeds. Every method trains from the same teacher and, per seed, the same student init and data order; the
results go to out_dir as comparison.json, comparison.md (the table, then one held-out problem as each method's student
finally writes it) and comparison.png (pass@1 against step, the budget and mean beta, the teacher log-prob of the
rollouts). With --resume=true, finished runs are read back and an interrupted one continues from its last checkpoint.
"""
import dataclasses
import json
import math
from pathlib import Path

import torch


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def run_dir(out_dir, method, seed):
    return Path(out_dir) / f"{method}_seed{seed}"


def compare(cfg, train):
    """Every method in cfg.compare for every seed in cfg.seeds (same teacher, same per-seed student init), each run by
    train(run_cfg) -> its metrics history; writes comparison.{json,md,png} to cfg.out_dir."""
    methods, seeds = cfg.compare.split(","), [int(s) for s in cfg.seeds.split(",")]

    def run(method, seed):  # with --resume=true, finished runs are read back and interrupted ones continue
        out_dir = str(run_dir(cfg.out_dir, method, seed))
        run_cfg = dataclasses.replace(cfg, method=method, seed=seed, compare="", out_dir=out_dir)
        if cfg.resume and (Path(run_cfg.out_dir) / "summary.json").exists():
            return [json.loads(line) for line in open(Path(run_cfg.out_dir) / "metrics.jsonl")]
        return train(run_cfg)

    runs = {m: [run(m, s) for s in seeds] for m in methods}
    lines = ["| method | final pass@1 | best pass@1 | final greedy | teacher log-prob (warmup) | final pass@1 per seed |",
             "|---|---|---|---|---|---|"]
    results = {}
    for m, histories in runs.items():
        evals = [[row for row in h if "pass@1" in row] for h in histories]
        final, best = [e[-1]["pass@1"] for e in evals], [max(r["pass@1"] for r in e) for e in evals]
        greedy = [e[-1]["greedy"] for e in evals]
        warm = [r["teacher_logprob"] for h in histories for r in h if 0 < r["step"] <= cfg.warmup_steps]
        results[m] = {"seeds": seeds, "final": final, "best": best, "final_greedy": greedy,
                      "final_mean": mean_std(final)[0], "final_std": mean_std(final)[1],
                      "best_mean": mean_std(best)[0], "best_std": mean_std(best)[1],
                      "teacher_logprob_warmup": sum(warm) / len(warm) if warm else None}
        cell = lambda xs: "{:.3f} ± {:.3f}".format(*mean_std(xs))
        per_seed = ", ".join(f"{x:.3f}" for x in final)
        lines.append(f"| {m} | {cell(final)} | {cell(best)} | {cell(greedy)} | "
                     f"{results[m]['teacher_logprob_warmup'] or math.nan:.3f} | {per_seed} |")
    out = Path(cfg.out_dir)
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    initial = [h[0]["pass@1"] for h in next(iter(runs.values()))]
    note = (f"\nHeld-out pass@1 (n={cfg.eval_samples}, T={cfg.eval_temperature}), mean ± std over seeds {cfg.seeds}, "
            f"initial student {mean_std(initial)[0]:.3f} ± {mean_std(initial)[1]:.3f}, "
            f"{cfg.max_steps} steps, eps0={cfg.eps0}, warmup_steps={cfg.warmup_steps}. Teacher log-prob: mean log pi_T "
            f"of rollout tokens over the first warmup_steps steps.\n")
    text = "\n".join(lines) + "\n" + note + example(out, methods, seeds[0])
    (out / "comparison.md").write_text(text)
    plot_comparison(runs, out / "comparison.png", cfg)
    print(text)


def example(out, methods, seed):
    """Held-out problem 0 as the runs of one seed left it (from their samples.jsonl): the teacher's greedy completion,
    the initial student's (the same for every method) and each method's final one; "" without samples."""
    logs = {m: run_dir(out, m, seed) / "samples.jsonl" for m in methods}
    if not all(path.exists() for path in logs.values()):
        return ""
    rows = {m: [r for r in map(json.loads, open(path)) if r["problem"] == 0] for m, path in logs.items()}
    teacher = [r for r in rows[methods[0]] if r["model"] == "teacher"]
    student = {m: [r for r in rows[m] if r["model"] == "student"] for m in methods}  # in step order
    if not teacher or not all(student.values()):
        return ""
    shown = [("teacher", teacher[0]), ("student, step 0", student[methods[0]][0])]
    shown += [(f"{m}, step {student[m][-1]['step']}", student[m][-1]) for m in methods]
    lines = [f"\nHeld-out problem 0, greedy, seed {seed}: {teacher[0]['question'].strip()} "
             f"(answer {teacher[0]['answer']})", "```text"]
    for label, row in shown:
        completion = json.dumps(row["completion"])[1:-1]  # one line: newlines escaped
        completion = completion if len(completion) <= 100 else "..." + completion[-97:]  # the end holds the answer
        lines.append(f"{label:20s} {'right' if row['correct'] else 'wrong'}  {completion}")
    return "\n".join(lines + ["```", ""])


def plot_comparison(runs, path, cfg):
    """pass@1 vs step (mean over seeds, band = min..max); eps and mean beta; teacher log-prob of rollouts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    beta_axis = axes[1].twinx()  # eps ~ 1e-2 and beta in [0, 1] need their own scales
    for i, (m, histories) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [row["step"] for row in histories[0] if "pass@1" in row]
        curves = torch.tensor([[row["pass@1"] for row in h if "pass@1" in row] for h in histories])  # (seeds, evals)
        axes[0].plot(steps, curves.mean(0), color=color, marker="o", label=m)
        axes[0].fill_between(steps, curves.min(0).values, curves.max(0).values, color=color, alpha=0.2)
        rows = [row for row in histories[0] if "loss" in row]
        train_steps = [r["step"] for r in rows]
        axes[1].plot(train_steps, [r["eps"] for r in rows], color=color, label=m)
        beta = torch.tensor([[r["beta"] for r in h if "loss" in r] for h in histories]).mean(0)  # (steps,)
        beta_axis.plot(train_steps, beta, color=color, linestyle="--")
        logprob = torch.tensor([[r["teacher_logprob"] for r in h if "loss" in r] for h in histories]).mean(0)
        axes[2].plot(train_steps, logprob, color=color, label=m)
    axes[0].set(xlabel="step", ylabel="held-out pass@1", title=f"pass@1 (mean over seeds {cfg.seeds}, band min-max)")
    axes[1].set(xlabel="step", ylabel="KL budget eps (solid)", title="KL budget (solid) and mean beta (dashed)")
    beta_axis.set(ylabel="mean beta over rollout tokens (dashed)", ylim=(-0.02, 1.02))
    axes[2].set(xlabel="step", ylabel="mean log pi_T(sampled token)", title="teacher log-prob of rollout tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
