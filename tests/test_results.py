"""The results page's 400-step results (docs/results.md) are the committed comparison files' numbers
(docs/results/400_steps, written by train_small.py --compare): each file's paired intervals are what its per-seed
values give, and the page's strength table is plot_strengths' table of those files, digit for digit."""
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
    """The comparison files that pair methods with OPD (a tuning file holds one method)."""
    return [p for p in sorted(RESULTS.rglob("comparison.json")) if len(json.loads(p.read_text())["methods"]) > 1]


def test_there_are_results_at_three_strengths():
    """The weak-student protocol's evaluation is committed at three or more initial strengths, each with its table."""
    assert len(STRENGTHS) >= 3 and all((RESULTS / f"strength{s}" / "comparison.md").is_file() for s in STRENGTHS)


@pytest.mark.parametrize("path", comparisons(), ids=lambda p: str(p.relative_to(RESULTS).parent))
def test_each_files_intervals_are_its_per_seed_differences(path):
    """method - OPD in final pass@1 and AUC is the paired interval of the per-seed values the file holds."""
    methods = json.loads(path.read_text())["methods"]
    for name, row in methods.items():
        if name == "opd":
            continue
        assert row["vs_opd"]["final"]["n_seeds"] == len(row["final"]) == len(methods["opd"]["final"]) == 8
        for key in ("final", "auc"):
            expected = compare.paired_ci([a - b for a, b in zip(row[key], methods["opd"][key])])
            assert row["vs_opd"][key]["mean"] == pytest.approx(expected["mean"], abs=1e-12)
            assert row["vs_opd"][key]["ci95"] == pytest.approx(expected["ci95"], abs=1e-12)


def test_the_results_page_strength_table_is_plot_strengths_table_of_the_files():
    """docs/results.md quotes plot_strengths' table of the committed strengths exactly as the command prints it."""
    points = plot_strengths.strength_points([(str(s), RESULTS / f"strength{s}") for s in STRENGTHS])
    assert plot_strengths.table(points) in (ROOT / "docs" / "results.md").read_text()
