"""``lightning-scaling fit``: output, the law file the planner reads, plots, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
from importlib.resources import files

import numpy as np
import pytest

from lightning_scaling.cli import main
from lightning_scaling.laws import ChinchillaLaw, load_law

SARDANA = str(files("lightning_scaling.data") / "sardana2023_trainingresults.csv")


def _isoflop_csv(path, budgets=(1e17, 1e18, 1e19)):
    law = ChinchillaLaw(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)
    lines = ["params,flops,loss"]
    for c in budgets:
        mid = (c / 120) ** 0.5
        for n in np.geomspace(mid / 8, mid * 8, 7):
            lines.append(f"{n},{c},{float(law.loss(n, c / (6 * n)))}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_fit_approach3_json_and_law_file_round_trip(tmp_path, capsys):
    out = tmp_path / "fitted.json"
    assert main(["fit", SARDANA, "--approach", "3", "--json", "--out", str(out), "--bootstrap", "20"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["law"]["kind"] == "chinchilla" and report["n_points"] == 47
    assert 0 < report["fit"]["a"] < 1 and report["fit"]["a"] + report["fit"]["b"] == pytest.approx(1)
    lo, hi = report["bootstrap"]["intervals"]["alpha"]
    assert lo <= report["law"]["alpha"] <= hi
    law = load_law(out)
    assert isinstance(law, ChinchillaLaw) and law.alpha == pytest.approx(report["law"]["alpha"])
    saved = json.loads(out.read_text())
    assert saved["fit"]["approach"] == "3" and "intervals" in saved["fit"]
    # the planner takes the fitted law
    assert main(["plan", "--law-file", str(out), "--flops", "1e21", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert json.dumps(plan)  # a JSON object came back


def test_fit_approach2_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra (matplotlib)")
    csv_path = _isoflop_csv(tmp_path / "ladder.csv")
    png = tmp_path / "fit.png"
    assert main(["fit", csv_path, "--approach", "2", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "approach 2" in text and "N_opt" in text
    a = float(next(line.split()[1] for line in text.splitlines() if line.strip().startswith("a ")))
    assert a == pytest.approx(0.37 / 0.72, abs=0.03)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["fit", "/nonexistent/runs.csv"], "does not exist"),
        (["fit", "{tmp}/ladder.csv", "--approach", "2", "--out", "{tmp}/x.json"], "--out needs a loss law"),
        (["fit", "{tmp}/ladder.csv", "--loss-column", "nope"], "no column 'nope'"),
        (["fit", "{tmp}/one_budget.csv", "--approach", "2"], "at least 2 compute budgets"),
        (["fit", "{tmp}/few.csv"], "needs more than 5 points"),
        (["fit", "{tmp}/ladder.csv", "--bootstrap", "-1"], "--bootstrap"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, match):
    _isoflop_csv(tmp_path / "ladder.csv")
    _isoflop_csv(tmp_path / "one_budget.csv", budgets=(1e18,))
    (tmp_path / "few.csv").write_text("params,tokens,loss\n" + "".join(f"{n},1e9,{3 - n / 1e7}\n" for n in
                                                                       (1e6, 2e6, 3e6, 4e6)))
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_scaling_ladder_quick_path_fits_and_writes_a_law(tmp_path, capsys):
    import scaling_ladder  # examples/ is on sys.path (tests/conftest.py)

    assert scaling_ladder.main(["--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "fitting 6 runs" in text and "next run at" in text
    law = load_law(tmp_path / "fitted.json")
    assert isinstance(law, ChinchillaLaw) and law.alpha > 0 and law.beta > 0
