"""
`python -m scripts.plot_strengths --out=docs/strengths.png 50=DIR 100=DIR 200=DIR`: one comparison per initial student
strength (each DIR holds the comparison.json that `train_small.py --compare=opd,trb` wrote, the label its
student_sft_steps), drawn as the paired difference method - OPD in final pass@1 and in AUC, with its 95% interval,
against the initial pass@1 of the student. Prints the points as a markdown table and the path written; reads only
comparison.json, so the figure is remade from the compare output alone. Without --out the figure goes to
runs/strengths.png, out of git's view: the committed docs/strengths.png is written only when named.
"""
import argparse
import json
from pathlib import Path

from distill import compare


def strength_points(labelled_dirs, method="trb"):
    """Per (label, dir), in the order given: the label, the initial pass@1 (mean and 95% interval over seeds), and
    method - OPD in final pass@1 and AUC ({"mean", "ci95", "n_seeds"}) as comparison.json holds them."""
    points = []
    for label, folder in labelled_dirs:
        results = json.loads((Path(folder) / "comparison.json").read_text())
        row = results["methods"][method]
        points.append({"label": label, "initial": compare.paired_ci(row["initial"]),
                       "final": row["vs_opd"]["final"], "auc": row["vs_opd"]["auc"]})
    return points


def table(points, method="trb"):
    """The points as a markdown table: strength, initial pass@1, method - OPD final and AUC with 95% intervals."""
    def cell(stat, sign="+"):
        lo, hi = stat["ci95"]
        return f"{stat['mean']:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"

    lines = [f"| student_sft_steps | initial pass@1 | {method} - opd, final pass@1 | {method} - opd, AUC | seeds |",
             "|---|---|---|---|---|"]
    lines += [f"| {p['label']} | {cell(p['initial'], '')} | {cell(p['final'])} | {cell(p['auc'])} | "
              f"{p['final']['n_seeds']} |" for p in points]
    return "\n".join(lines) + "\n"


def plot_x(points, min_gap):
    """Where each point is drawn on the initial pass@1 axis: at its mean, except that a point closer than min_gap to
    the one drawn before it (in order of initial pass@1) moves right to min_gap from it, so points do not hide
    each other; returns the x per point (input order) and whether any moved."""
    order = sorted(range(len(points)), key=lambda i: points[i]["initial"]["mean"])
    xs, moved, last = [0.0] * len(points), False, None
    for i in order:
        x = points[i]["initial"]["mean"]
        if last is not None and x < last + min_gap:
            x, moved = last + min_gap, True
        xs[i], last = x, x
    return xs, moved


def plot_strengths(points, path, method="trb"):
    """Two panels, method - OPD in final pass@1 and in AUC against the initial pass@1: mean and 95% interval per
    strength (vertical bars), the initial pass@1's own interval (horizontal bars), each point labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    span = max(p["initial"]["ci95"][1] for p in points) - min(p["initial"]["ci95"][0] for p in points)
    xs, moved = plot_x(points, min_gap=max(span, 0.01) * 0.06)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "final", "final pass@1"), (axes[1], "auc", "AUC (mean pass@1 over evaluations)")):
        for rank, (x, p) in enumerate(sorted(zip(xs, points), key=lambda pair: pair[0])):
            stat, initial = p[key], p["initial"]
            ax.errorbar([x], [stat["mean"]], yerr=[[stat["mean"] - stat["ci95"][0]], [stat["ci95"][1] - stat["mean"]]],
                        xerr=[[initial["mean"] - initial["ci95"][0]], [initial["ci95"][1] - initial["mean"]]],
                        fmt="o", capsize=4, color="C0", ecolor="C0")
            ax.annotate(f"{p['label']} SFT steps", (x, stat["mean"]), textcoords="offset points",
                        xytext=(6, 6 if rank % 2 == 0 else -14), fontsize=8)  # neighbours' labels alternate sides
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xlabel="initial student pass@1 (mean over seeds, 95% CI)", ylabel=f"{method} - opd, {name}",
               title=name)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))  # readable ticks on a narrow range
        ax.grid(alpha=0.3)
    n = points[0]["final"]["n_seeds"]
    note = "\n(points with about the same initial pass@1 drawn side by side)" if moved else ""
    fig.suptitle(f"{method} - opd, paired by seed: mean and 95% CI over {n} seeds, against the initial student's "
                 f"pass@1{note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scripts.plot_strengths",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=DIR: a strength's label (its student_sft_steps) and the folder "
                                                "holding its comparison.json")
    parser.add_argument("--out", default="runs/strengths.png", help="the figure's path, its folder made if missing "
                                                                    "(default: %(default)s, untracked; the committed "
                                                                    "figure: docs/strengths.png)")
    parser.add_argument("--method", default="trb", help="the method compared with opd")
    args = parser.parse_args(argv)
    labelled = [tuple(item.split("=", 1)) for item in args.runs]
    if any(len(pair) != 2 for pair in labelled):
        parser.error("each run is LABEL=DIR")
    missing = [folder for _, folder in labelled if not (Path(folder) / "comparison.json").is_file()]
    if missing:
        parser.error(f"{missing[0]}: no comparison.json (write one with train_small.py --compare=opd,trb)")
    points = strength_points(labelled, args.method)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_strengths(points, args.out, args.method)
    print(table(points, args.method), end="")
    print(f"wrote {args.out}")
    return points


if __name__ == "__main__":
    main()
