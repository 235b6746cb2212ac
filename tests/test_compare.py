"""compare.py's statistics on synthetic numbers with known answers: Student's t quantiles, paired confidence
intervals (exact for a small case, and their coverage by simulation), and sentences that claim only what they show."""
import math
import random

import pytest

from distill import compare


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (7, 2.3646), (15, 2.1314),
                                          (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_published_tables(df, expected):
    """t_{0.975, df} to 4 decimals, as printed in statistics tables (and the normal's 1.96 for large df)."""
    assert compare.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_paired_ci_of_a_known_sample():
    """1..5: mean 3, sd sqrt(2.5), so the interval is 3 -/+ 2.7764 * sqrt(2.5) / sqrt(5) = [1.0368, 4.9632]."""
    stat = compare.paired_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stat["mean"] == pytest.approx(3.0) and stat["n_seeds"] == 5
    assert stat["ci95"] == pytest.approx([1.0368, 4.9632], abs=1e-4)
    one = compare.paired_ci([0.2])
    assert one["mean"] == 0.2 and all(math.isnan(x) for x in one["ci95"])


def test_paired_ci_covers_the_true_mean_95_percent_of_the_time():
    """Over 4000 simulated 8-seed experiments with a true difference of 0.01 (normal noise, sd 0.05) the interval holds
    0.01 in 95% of them: 3 binomial standard errors (0.010) of slack."""
    rng = random.Random(0)
    hits = 0
    for _ in range(4000):
        stat = compare.paired_ci([0.01 + rng.gauss(0, 0.05) for _ in range(8)])
        hits += stat["ci95"][0] <= 0.01 <= stat["ci95"][1]
    assert abs(hits / 4000 - 0.95) <= 0.010


def test_verdict_says_significant_only_when_the_interval_excludes_zero():
    """An interval that holds 0 is 'not significant'; one that excludes it names the side by its sign."""
    assert "not significant at 8 seeds" in compare.verdict("trb - opd", {"mean": 0.01, "ci95": [-0.02, 0.04],
                                                                         "n_seeds": 8})
    text = compare.verdict("trb - opd", {"mean": 0.05, "ci95": [0.01, 0.09], "n_seeds": 8})
    assert "significant at 8 seeds" in text and "not" not in text and "+0.050 [+0.010, +0.090]" in text


def test_the_report_lists_every_arm_even_where_two_share_a_label():
    """Two teacher-warmup arms (TRB at eps0 = inf with different learning rates) both get their row in the paired
    table and their sentence, each with its own interval."""
    from types import SimpleNamespace
    arm = lambda label, final: {"label": label, "final": final, "auc": final, "best": final, "final_greedy": final,
                                "initial": [0.0, 0.0, 0.0], "teacher_logprob_warmup": None}
    methods = {"opd": arm("opd", [0.1, 0.2, 0.3]), "trb:eps0=inf:lr=0.001": arm("teacher warmup", [0.2, 0.3, 0.5]),
               "trb:eps0=inf:lr=0.002": arm("teacher warmup", [0.0, 0.1, 0.1])}
    for name in ("trb:eps0=inf:lr=0.001", "trb:eps0=inf:lr=0.002"):
        methods[name]["vs_opd"] = {key: compare.paired_ci([a - b for a, b in zip(methods[name][key],
                                                                                   methods["opd"][key])])
                                   for key in ("final", "auc")}
    cfg = SimpleNamespace(seeds="0,1,2", eval_every=25, eval_size=8, eval_samples=2, eval_temperature=1.0,
                          max_steps=100, eps0=0.02, warmup_steps=50, student_sft_steps=100)
    text = compare.report({"methods": methods, "seeds": [0, 1, 2]}, cfg)
    paired = text.split("arm - opd")[1]
    assert paired.count("| teacher warmup | +0.133") == 1 and paired.count("| teacher warmup | -0.133") == 1
    assert text.count("- teacher warmup - opd:") == 2
