"""tools.learning_curve end to end on the tiny model and the built-in sample: one run directory per
point with only the SFT stages, each scored on the valid split, a table, its JSON and a chart;
a second call trains and generates nothing."""

import json
import xml.etree.ElementTree as ET

from tools import learning_curve

TRAIN = ["--model", "tiny", "--max-seq-len", "1024", "--max-new-tokens", "12", "--sft-batch-size", "4",
         "--dtype", "fp32"]
CURVE = ["--dialogues", "1", "3", "--eval-turns", "6", "--bootstrap-replicates", "20", "--no-progress"]


def test_learning_curve_of_the_sft_systems(tmp_path, capsys):
    out = tmp_path / "curve"
    assert learning_curve.main(["--out", str(out), *CURVE, *TRAIN]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "curve.md", "curve.svg", "d1", "d3"]
    for point in ("d1", "d3"):
        done = {p.parent.name for p in (out / point).glob("*/DONE.json")}
        assert done == {"sft-sp", "sft-vanilla"}  # nothing else trained
    curve = json.loads((out / "curve.json").read_text())
    assert curve["valid_turns"] == 6
    rows = {(r["dialogues"], r["system"]): r for r in curve["rows"]}
    assert set(rows) == {(n, s) for n in (1, 3) for s in ("Vanilla SFT", "Decoupled SFT", "Chance: majority",
                                                           "Chance: prior")}
    for system in ("Vanilla SFT", "Decoupled SFT"):
        one, three = rows[(1, system)], rows[(3, system)]
        assert 0 < one["turns"] < three["turns"] and 0 < one["steps"] <= three["steps"]
        diff = three["Q_W_minus_prior"]
        assert diff["value"] == three["Q_W"] - rows[(3, "Chance: prior")]["Q_W"]
        assert 0 <= three["Acc"] <= 100 and three["Q_W_ci"]["replicates"] == 20
    table = (out / "curve.md").read_text()
    assert table.count("| Chance: prior |") == 1 and table.count("| Decoupled SFT |") == 2
    svg = ET.fromstring((out / "curve.svg").read_text())
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 2  # one line per system
    assert "curve written to" in capsys.readouterr().out

    assert learning_curve.main(["--out", str(out), *CURVE, *TRAIN]) == 0
    printed = capsys.readouterr().out
    assert printed.count("up to date, skipped") == 4 and json.loads((out / "curve.json").read_text()) == curve


def test_learning_curve_sets_the_run_directory_itself(tmp_path, capsys):
    assert learning_curve.main(["--out", str(tmp_path), *CURVE, *TRAIN, "--run-dir", "x"]) == 2
    assert "--run-dir is set per point" in capsys.readouterr().err
