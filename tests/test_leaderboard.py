"""leaderboard.py: the tables from records/*/metrics.json, newest first, the current record marked."""
import json
from pathlib import Path

import leaderboard

ROOT = Path(__file__).resolve().parents[1]


def write_metrics(root, track, folder, **kw):
    d = Path(root) / track / folder
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(dict(track=track, **kw)))


def test_leaderboard_regeneration(tmp_path):
    root = tmp_path / "records"
    write_metrics(root, "cpu", "2025-01-02_b", fid=12.3456, adherence={"all": 0.25, "colour": 0.5}, n=1000,
                  wall_clock_s=1800, hardware="CPU x2",
                  date="2025-01-02", description="second")
    write_metrics(root, "cpu", "2025-01-03_c", fid=9.0, adherence={"all": 0.5}, adherence_train={"all": 0.75}, n=1000,
                  wall_clock_s=600, hardware="CPU x2", date="2025-01-03", description="third", protocol_version=2,
                  train_flops=4.5678e13)
    write_metrics(root, "cpu", "2025-01-01_a", fid=20.0, cmmd=None, n=1000, wall_clock_s=7200.0, hardware="CPU x2",
                  date="2025-01-01", description="first")
    for p in (tmp_path / "README.md", root / "README.md"):
        p.write_text("# T\n\n<!-- records:start -->\nold\n<!-- records:end -->\n\nafter\n")
    assert len(leaderboard.write_leaderboard(root, (tmp_path / "README.md", root / "README.md"))) == 2
    head = ("| # | FID | CMMD | DINO-MMD | adherence held-out / train | N | wall clock | training FLOPs | hardware "
            "| date | description | folder |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    expected = ("### cpu track, protocol v2\n\n" + head +  # newest first, numbered by date, the current one marked
                "| 1 | 9.00 | - | - | 50.0 % / 75.0 % | 1000 | 10.0 min | 4.57e+13 | CPU x2 | 2025-01-03 | "
                "**current:** third | [cpu/2025-01-03_c](cpu/2025-01-03_c) |\n\n"
                "### cpu track, protocol v1\n\n" + head +
                "| 2 | 12.35 | - | - | 25.0 % / - | 1000 | 30.0 min | - | CPU x2 | 2025-01-02 | second | "
                "[cpu/2025-01-02_b](cpu/2025-01-02_b) |\n"
                "| 1 | 20.00 | - | - | - / - | 1000 | 2.00 h | - | CPU x2 | 2025-01-01 | first | "
                "[cpu/2025-01-01_a](cpu/2025-01-01_a) |")
    assert (root / "README.md").read_text() == (f"# T\n\n<!-- records:start -->\n{expected}\n<!-- records:end -->"
                                                "\n\nafter\n")
    assert "[cpu/2025-01-01_a](records/cpu/2025-01-01_a)" in (tmp_path / "README.md").read_text()


    assert leaderboard.one_line("x" * 200).endswith("…") and len(leaderboard.one_line("x" * 200)) == 90
