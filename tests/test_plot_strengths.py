"""plot_strengths.py remakes the strength figure from comparison.json files alone: the points are the paired
differences those files hold, the initial pass@1 is each strength's mean with its interval, and points that share an
initial pass@1 are drawn apart."""
import json
from pathlib import Path

import pytest

from distill import compare
from scripts import plot_strengths

ROOT = Path(__file__).resolve().parents[1]


def write_comparison(folder, initial, final_diffs, auc_diffs):
    """A comparison.json as compare.summarise writes it, for opd and trb with the given per-seed numbers."""
    folder.mkdir(parents=True)
    opd_final, opd_auc = [0.2] * len(initial), [0.1] * len(initial)
    trb = {"initial": initial, "final": [a + d for a, d in zip(opd_final, final_diffs)],
           "auc": [a + d for a, d in zip(opd_auc, auc_diffs)]}
    trb["vs_opd"] = {"final": compare.paired_ci(final_diffs), "auc": compare.paired_ci(auc_diffs)}
    results = {"seeds": list(range(len(initial))), "methods": {
        "opd": {"initial": initial, "final": opd_final, "auc": opd_auc}, "trb": trb}}
    (folder / "comparison.json").write_text(json.dumps(results))


def test_points_are_the_paired_differences_of_each_comparison(tmp_path):
    """Each point carries its label, the mean initial pass@1 and the file's trb - opd intervals, in the order given."""
    write_comparison(tmp_path / "a", [0.0, 0.0, 0.0], [0.01, 0.03, 0.02], [0.0, 0.01, 0.02])
    write_comparison(tmp_path / "b", [0.04, 0.05, 0.06], [-0.01, 0.01, 0.0], [0.0, 0.0, 0.03])
    points = plot_strengths.strength_points([("50", tmp_path / "a"), ("200", tmp_path / "b")])
    assert [p["label"] for p in points] == ["50", "200"]
    assert points[1]["initial"]["mean"] == pytest.approx(0.05)
    assert points[0]["final"]["mean"] == pytest.approx(0.02)
    assert points[0]["final"]["ci95"] == pytest.approx(compare.paired_ci([0.01, 0.03, 0.02])["ci95"])
    assert points[1]["auc"]["mean"] == pytest.approx(0.01)


def test_points_with_the_same_initial_pass_at_1_are_drawn_apart():
    """Two strengths at initial pass@1 0 are drawn min_gap apart and the move is reported; distinct ones stay put."""
    point = lambda x: {"initial": {"mean": x}}
    xs, moved = plot_strengths.plot_x([point(0.0), point(0.0), point(0.3)], min_gap=0.01)
    assert xs == pytest.approx([0.0, 0.01, 0.3]) and moved
    assert plot_strengths.plot_x([point(0.2), point(0.0)], min_gap=0.01) == ([0.2, 0.0], False)


def test_the_command_writes_the_figure_and_prints_the_table(tmp_path, capsys):
    """main() writes a PNG and prints one table row per strength with the intervals as the file holds them."""
    write_comparison(tmp_path / "s50", [0.0, 0.0], [0.01, 0.03], [0.0, 0.02])
    write_comparison(tmp_path / "s200", [0.04, 0.06], [-0.01, 0.01], [0.0, 0.02])
    out = tmp_path / "fig.png"
    plot_strengths.main(["--out", str(out), f"50={tmp_path / 's50'}", f"200={tmp_path / 's200'}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 50 ") or
            line.startswith("| 200 ")]
    lo, hi = compare.paired_ci([0.01, 0.03])["ci95"]
    assert len(rows) == 2 and f"+0.020 [{lo:+.3f}, {hi:+.3f}]" in rows[0] and "0.050 [" in rows[1]


def test_a_folder_without_comparison_json_stops_with_one_line(tmp_path, capsys):
    """A LABEL=DIR whose DIR holds no comparison.json exits with code 2 and names the folder."""
    with pytest.raises(SystemExit) as stop:
        plot_strengths.main(["--out", str(tmp_path / "fig.png"), f"50={tmp_path / 'nowhere'}"])
    assert stop.value.code == 2 and "nowhere: no comparison.json" in capsys.readouterr().err
    assert not (tmp_path / "fig.png").exists()


def test_the_default_output_is_untracked_and_a_missing_folder_is_made(tmp_path, monkeypatch, capsys):
    """Without --out the figure goes to an ignored path outside docs/ (the committed figure is written only when
    named); an --out in folders that do not exist yet is written after making them; the last printed line names the
    file written."""
    write_comparison(tmp_path / "s50", [0.0, 0.0], [0.01, 0.03], [0.0, 0.02])
    monkeypatch.chdir(tmp_path)
    plot_strengths.main([f"50={tmp_path / 's50'}"])
    [written] = tmp_path.rglob("*.png")
    relative = written.relative_to(tmp_path)
    assert relative.parts[0] != "docs" and f"{relative.parts[0]}/" in (ROOT / ".gitignore").read_text().split()
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {relative}"
    out = tmp_path / "figures" / "new" / "fig.png"
    plot_strengths.main(["--out", str(out), f"50={tmp_path / 's50'}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}"
