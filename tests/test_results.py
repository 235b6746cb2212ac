"""The results pages quote the committed comparison files (docs/results/, written by train_small.py --compare): each
file's paired intervals are what its per-seed values give, the README's and the results page's default comparison is
docs/results/default's, and the page's strength table is plot_strengths' table of the 400-step files, digit for
digit."""
import json
from pathlib import Path

import pytest

from distill import compare
from scripts import plot_strengths

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "400_steps"
STRENGTHS = sorted((int(p.name.removeprefix("strength")) for p in RESULTS.glob("strength*")
                    if p.name.removeprefix("strength").isdigit()))


def comparisons():
    """Every committed comparison file that pairs arms with OPD (a tuning file may hold one arm)."""
    files = sorted((ROOT / "docs" / "results").rglob("comparison.json"))
    return [p for p in files if any("vs_opd" in arm for arm in json.loads(p.read_text())["methods"].values())]


def test_there_are_results_at_three_strengths():
    """The weak-student protocol's evaluation is committed at three or more initial strengths, each with its table."""
    assert len(STRENGTHS) >= 3 and all((RESULTS / f"strength{s}" / "comparison.md").is_file() for s in STRENGTHS)


@pytest.mark.parametrize("path", comparisons(), ids=lambda p: str(p.relative_to(ROOT / "docs" / "results").parent))
def test_each_files_intervals_are_its_per_seed_differences(path):
    """arm - OPD (the first arm whose method is OPD) in every paired endpoint is the interval of the per-seed values
    the file holds, over all of its seeds."""
    result = json.loads(path.read_text())
    methods = result["methods"]
    reference = next(name for name in methods if name.split(":")[0] == "opd")
    for name, row in methods.items():
        if name == reference:
            continue
        assert set(row["vs_opd"]) >= {"final", "auc"}
        for key, stat in row["vs_opd"].items():
            assert stat["n_seeds"] == len(row[key]) == len(methods[reference][key]) == len(result["seeds"])
            expected = compare.paired_ci([a - b for a, b in zip(row[key], methods[reference][key])])
            assert stat["mean"] == pytest.approx(expected["mean"], abs=1e-12)
            assert stat["ci95"] == pytest.approx(expected["ci95"], abs=1e-12)


def signed(stat):
    return f"{stat['mean']:+.3f} [{stat['ci95'][0]:+.3f}, {stat['ci95'][1]:+.3f}]"


def test_the_readme_and_the_results_page_quote_the_default_comparison_file():
    """The README's TRB - OPD intervals (final pass@1, AUC, the run's mean held-out KL) are the committed default
    comparison's, and the results page holds its comparison.md tables verbatim."""
    folder = ROOT / "docs" / "results" / "default"
    vs = json.loads((folder / "comparison.json").read_text())["methods"]["trb"]["vs_opd"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert all(signed(vs[key]) in readme for key in ("final", "auc", "mean_kl"))
    tables = (folder / "comparison.md").read_text().split("\nHeld-out problem 0")[0].strip()
    assert tables in (ROOT / "docs" / "results.md").read_text()


def test_the_results_page_strength_table_is_plot_strengths_table_of_the_files():
    """docs/results.md quotes plot_strengths' table of the committed strengths exactly as the command prints it."""
    points = plot_strengths.strength_points([(str(s), RESULTS / f"strength{s}") for s in STRENGTHS])
    assert plot_strengths.table(points) in (ROOT / "docs" / "results.md").read_text()


@pytest.mark.parametrize("strength, trb_arm", [(100, "trb:eps0=0.18:lr=0.002"), (50, "trb:eps0=0.32:lr=0.001")])
def test_the_readme_quotes_the_premise_experiment_files(strength, trb_arm):
    """The README's sentence on the premise quotes each strength's final held-out KL intervals (teacher warmup - OPD,
    TRB at the half-gap budget - OPD), and the results page holds its tables verbatim."""
    folder = ROOT / "docs" / "results" / "premise" / f"strength{strength}"
    methods = json.loads((folder / "comparison.json").read_text())["methods"]
    by_label = {row["label"]: row for row in methods.values()}
    readme = " ".join((ROOT / "README.md").read_text().split())
    for label in ("teacher warmup", trb_arm):
        assert signed(by_label[label]["vs_opd"]["final_kl"]) in readme
    tables = (folder / "comparison.md").read_text().split("\nHeld-out problem 0")[0].strip()
    assert tables in (ROOT / "docs" / "results.md").read_text()
