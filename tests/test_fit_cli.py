"""``lightning-scaling fit``: output, the law file the planner reads, plots, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
from importlib.resources import files

import numpy as np
import pytest

from lightning_scaling.cli import main
from lightning_scaling.laws.definitions import ChinchillaLaw, load_law

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
    # the runs' range travels with the law, so that `plan --law-file` can say when it extrapolates
    fitted = saved["fit"]["fitted_range"]
    assert fitted["params"][0] == pytest.approx(min(report_params := _sardana_column("Parameters")))
    assert fitted["params"][1] == pytest.approx(max(report_params))
    assert 0 < fitted["tokens"][0] < fitted["tokens"][1]
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


def _sardana_column(name):
    import csv

    with open(SARDANA, newline="") as handle:
        return [float(row[name]) for row in csv.DictReader(handle)]


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
    import scaling_ladder  # examples/ is on the tests' path (pyproject: [tool.pytest.ini_options] pythonpath)

    assert scaling_ladder.main(["--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "fitting 6 runs" in text and "next run at" in text
    law = load_law(tmp_path / "fitted.json")
    assert isinstance(law, ChinchillaLaw) and law.alpha > 0 and law.beta > 0


# --- bad input names its flag; the fitter's refusals exit 2; the output survives `| head` (issues 14, 15) ----


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra, flag", [
    (["--seed", "-1", "--bootstrap", "3"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--bootstrap", "-2"], "--bootstrap"),
    (["--confidence", "1"], "--confidence"),
    (["--confidence", "nan"], "--confidence"),
    (["--budget", "0"], "--budget"),
    (["--budget", "inf"], "--budget"),
    (["--budget", "10"], "--budget 10"),  # the optimum would be a fraction of a parameter
    (["--budget-tolerance", "-0.1"], "--budget-tolerance"),
    (["--drop-highest-loss", "-1"], "--drop-highest-loss"),
    (["--drop-highest-loss", "21"], "--drop-highest-loss 21"),  # 21 points: none would be left
    (["--loss-column", "nope"], "--loss-column 'nope'"),
    (["--params-column", "size"], "--params-column 'size'"),
    (["--flops-column", ""], "--flops-column"),
    (["--out", "{tmp}/no/such/folder/law.json", "--approach", "kaplan"], "--out"),
    (["--out", "{tmp}", "--approach", "kaplan"], "--out"),
    (["--plot", "{tmp}/no/such/folder/fit.png"], "--plot"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, extra, flag):
    csv_path = _isoflop_csv(tmp_path / "ladder.csv")
    argv = ["fit", csv_path, "--approach", "2", *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    code, out, err = _run(capsys, argv)
    assert code == 2, (code, err)
    assert err.startswith(f"lightning-scaling fit: error: {flag}") and err.count("\n") == 1, err
    assert out == "" and "Traceback" not in err


def test_a_fitter_value_error_is_one_clean_line(tmp_path, capsys, monkeypatch):
    # the fitter refuses degenerate runs (constant loss, one model size) with a ValueError: exit 2, one line, even
    # when its message spans lines
    from lightning_scaling.laws import fitting as F

    def refuse(*args, **kwargs):
        raise ValueError("the loss is constant across runs;\nthere is nothing to fit")

    monkeypatch.setattr(F, "fit_approach3", refuse)
    csv_path = _isoflop_csv(tmp_path / "ladder.csv")
    code, out, err = _run(capsys, ["fit", csv_path, "--approach", "3", "--json"])
    assert code == 2 and out == ""
    assert err == (f"lightning-scaling fit: error: cannot fit {csv_path}: the loss is constant across runs; there is "
                   "nothing to fit\n")


def test_a_budget_far_from_the_runs_warns(tmp_path, capsys):
    csv_path = _isoflop_csv(tmp_path / "ladder.csv")  # budgets 1e17 to 1e19
    code, out, err = _run(capsys, ["fit", csv_path, "--approach", "2", "--budget", "1e21", "--json"])
    assert code == 0
    assert err == ("lightning-scaling fit: warning: --budget 1e+21 FLOPs lies more than 10x outside the runs' FLOPs "
                   "(1e+17 to 1e+19): the optimum there is an extrapolation of the fit\n")
    assert json.loads(out)["warnings"] == [err.removeprefix("lightning-scaling fit: warning: ").strip()]
    code, out, err = _run(capsys, ["fit", csv_path, "--approach", "2", "--budget", "1e20", "--json"])
    assert code == 0 and err == "" and json.loads(out)["warnings"] == []


@pytest.mark.slow
def test_fit_json_into_a_closed_pipe_exits_quietly(tmp_path):
    # issue 15: `lightning-scaling fit --json | head -3` printed a BrokenPipeError traceback
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("lightning-scaling") or str(Path(sys.executable).with_name("lightning-scaling"))
    csv_path = _isoflop_csv(tmp_path / "ladder.csv")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, as `| head -0` leaves it
    try:
        done = subprocess.run([script, "fit", csv_path, "--approach", "2", "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 141  # 128 + SIGPIPE, like `cat` in the same place
