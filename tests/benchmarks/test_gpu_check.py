"""benchmarks/gpu_check.py without a GPU: the dry run, the plan against the budget, the Markdown writer, the
runner's time limits and failure handling, how outputs are read, and the refusal without CUDA."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _plan_rows(gc: ModuleType, text: str) -> list[list[str]]:
    table = gc.parse_markdown_table(text.splitlines(), "time limit s")
    assert table is not None, text
    return table[1]


# ------------------------------------------------------------------------------------------ dry run, plan


@pytest.mark.slow
@pytest.mark.parametrize("budget", [480, 200])
def test_dry_run_plans_the_six_items_within_the_budget(gc, budget):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--budget-s", str(budget)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _plan_rows(gc, done.stdout)
    assert {int(re.match(r"\d+", r[0]).group()) for r in rows} == {1, 2, 3, 4, 5, 6}
    limits = [float(r[3]) for r in rows]
    assert all(limit >= gc.MIN_RUN_S for limit in limits)
    total = re.search(r"total planned: (\d+) s of (\d+) s budget", done.stdout)
    assert total and int(total.group(2)) == budget
    assert sum(limits) == int(total.group(1)) <= budget - gc.reserve_seconds(budget)
    assert "dry run: ok" in done.stdout
    assert "benchmarks/attention.py --markdown --full" in done.stdout
    assert "--device cuda" in done.stdout
    assert "benchmarks/norm.py --markdown" in done.stdout


@pytest.mark.parametrize("budget", [120, 180, 480, 1200])
@pytest.mark.parametrize("only", [None, "2b,4", "5", "1"])
def test_plan_fits_the_budget_and_keeps_the_order(gc, budget, only):
    items = gc.select_items(gc.build_items(pytest_xdist=True, pytest_timeout=True), only)
    planned = gc.plan(items, budget)
    assert [i.id for i, _ in planned] == [i.id for i in items]
    assert sum(s for _, s in planned) <= budget - gc.reserve_seconds(budget)
    assert all(s >= gc.MIN_RUN_S for _, s in planned)
    if only is None:  # pytest, the most important run, gets the largest share
        assert max(planned, key=lambda p: p[1])[0].id == "1"


def test_plan_refuses_a_budget_too_small(gc):
    items = gc.build_items(False, False)
    with pytest.raises(ValueError, match="budget_s"):
        gc.plan(items, 30)
    with pytest.raises(ValueError, match="budget_s=60 leaves runs"):  # every run would get under MIN_RUN_S
        gc.plan(items, 60)
    assert gc.plan(gc.select_items(items, "4"), 60)[0][1] >= gc.MIN_RUN_S  # one run fits in 60 s


def test_only_selects_runs_and_names_the_flag_when_wrong(gc):
    items = gc.build_items(False, False)
    assert [i.id for i in gc.select_items(items, "2b, 4")] == ["2b", "4"]
    assert [i.id for i in gc.select_items(items, "5")] == ["5a", "5b"]
    assert [i.id for i in gc.select_items(items, "4,1")] == ["1", "4"]  # always in the plan's order
    assert [i.id for i in gc.select_items(items, "6")] == ["6"]
    for bad in ("7", "", "2c"):
        with pytest.raises(ValueError, match="--only"):
            gc.select_items(items, bad)


def test_pytest_run_uses_the_plugins_only_when_installed(gc):
    with_plugins = gc.build_items(pytest_xdist=True, pytest_timeout=True)[0].argv
    without = gc.build_items(pytest_xdist=False, pytest_timeout=False)[0].argv
    assert "-n" in with_plugins and any(a.startswith("--timeout=") for a in with_plugins)
    assert "-n" not in without and not any(a.startswith("--timeout") for a in without)
    assert "tests/kernels/test_gpu.py" in without


# ------------------------------------------------------------------------------------------ markdown


def test_markdown_table_escapes_pipes_and_folds_newlines(gc):
    text = gc.markdown_table(["a", "b|c", "d"], [["x|y", "two\nlines", ""], [1, 2.5, None]])
    lines = text.splitlines()
    assert lines[1] == "|---|---|---|"
    assert gc.markdown_table_problems(text) == []
    assert all(len(gc._split_row(line)) == 3 for line in lines)
    assert "x\\|y" in lines[2] and "two lines" in lines[2]


def test_markdown_table_refuses_a_row_of_another_width(gc):
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        gc.markdown_table(["a", "b"], [["1", "2"], ["3"]])


def test_table_checker_finds_malformed_tables(gc):
    assert gc.markdown_table_problems("| a | b |\n| 1 | 2 |") != []  # no separator line
    assert gc.markdown_table_problems("| a | b |\n|---|---|\n| 1 | 2 | 3 |") != []  # a row too wide
    assert gc.markdown_table_problems("| a | b |\n|---|---|\n| 1 | 2") != []  # no closing pipe
    assert gc.markdown_table_problems("text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n") == []
    assert gc.markdown_table_problems("```text\n| not | a table\n```\n") == []  # code blocks are not tables


def test_report_from_fake_rows_is_well_formed_markdown(gc):
    planned = gc.plan(gc.build_items(False, False), 480)
    outcomes = gc._fake_outcomes(planned)
    outcomes[2].status, outcomes[2].granted_s, outcomes[2].seconds = "timed out at 60 s", 60.0, 65.0
    env = {
        "device": "NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB), 1 visible",
        "driver": "580.159.04",
        "torch": "2.11.0",
        "date": "2026-12-01 10:00 UTC",
    }
    report = gc.render_report(env, outcomes, 480, 401.0, ["a | note"])
    assert gc.markdown_table_problems(report) == []
    assert report.startswith("# GPU check: NVIDIA H200")
    summary = gc.parse_markdown_table(report.splitlines(), "status")
    assert summary is not None
    header, rows = summary
    assert [r[0] for r in rows] == [i.id for i, _ in planned]
    assert rows[2][header.index("status")] == "timed out at 60 s"
    assert "580.159.04" in report and "401 s used" in report


# ------------------------------------------------------------------------------------------ reading outputs


def test_pytest_output_is_read_when_failed_or_cut_short(gc):
    full = [
        "[gw0] [ 50%] PASSED tests/kernels/test_gpu.py::test_a[fp16]",
        "[gw1] [100%] FAILED tests/kernels/test_gpu.py::test_b[bf16-64]",
        "FAILED tests/kernels/test_gpu.py::test_b[bf16-64] - AssertionError: too far",
        "========== 1 failed, 1 passed in 12.30s ==========",
    ]
    ok, headline, section = gc.read_pytest(full)
    assert not ok and "1 failed, 1 passed" in headline and "test_b[bf16-64]" in headline
    assert "`tests/kernels/test_gpu.py::test_b[bf16-64]`" in section
    ok, headline, _ = gc.read_pytest(full[:1])  # killed at its limit: no summary line
    assert not ok and "1 passed" in headline and "cut short" in headline
    ok, headline, _ = gc.read_pytest(
        ["tests/kernels/test_gpu.py::test_a PASSED [100%]", "===== 1 passed in 1.0s ====="]
    )
    assert ok and headline == "1 passed in 1.0s"


def test_attention_and_mlp_tables_are_read_by_column_name(gc):
    attention = [
        "device: NVIDIA H200 | torch 2.11",
        gc.markdown_table(
            ["head_dim", "seq", "pass", "ours ms", "speed ours/sdpa"],
            [
                ["64", "1024", "fwd", "0.1", "1.20"],
                ["64", "1024", "fwd+bwd", "0.3", "0.91"],
                ["64", "2048", "fwd+bwd", "0.9", "1.05"],
                ["128", "1024", "fwd+bwd", "0.4", "0.80"],
            ],
        ),
    ]
    ok, headline, section = gc.read_attention("\n".join(attention).splitlines())
    assert ok and headline == "fwd+bwd ours/SDPA hd64: 0.91-1.05x, hd128: 0.80x (3 shapes)"
    assert "device: NVIDIA H200" in section and gc.markdown_table_problems(section) == []
    mlp = gc.markdown_table(
        ["d_model", "variant", "pass", "speed vs eager", "act mem vs eager"],
        [
            ["1024", "eager", "fwd+bwd", "1.00", "1.00"],
            ["1024", "fused elementwise", "fwd+bwd", "1.10", "0.50"],
            ["1024", "fused gemm", "fwd+bwd", "0.95", "0.25"],
            ["1024", "fused gemm", "fwd", "0.90", ""],
        ],
    )
    ok, headline, _ = gc.read_mlp(mlp.splitlines())
    assert (
        ok and headline == "fwd+bwd vs eager elementwise: 1.10x, gemm: 0.95x; act mem elementwise: 0.50x, gemm: 0.25x"
    )
    assert gc.read_attention(["benchmarks/attention.py: no CUDA GPU here. Nothing measured."])[0] is False


def test_norm_table_is_read_by_column_name(gc):
    rows = [
        ["layer", "1024", "torch", "fwd+bwd", "0.200", "1.00", "0.40"],
        ["layer", "1024", "fused", "fwd", "0.050", "1.50", "1.60"],
        ["layer", "1024", "fused", "fwd+bwd", "0.150", "1.33", "2.67"],
        ["layer", "4096", "fused", "fwd+bwd", "0.500", "1.10", "2.20"],
        ["layer", "4096", "fused, no per-example", "fwd+bwd", "0.450", "1.22", "2.44"],
        ["rms", "1024", "fused", "fwd+bwd", "0.120", "0.95", "3.00"],
    ]
    table = gc.markdown_table(
        ["norm", "H", "variant", "pass", "ms", "speed vs torch", "speed vs torch+per-example"], rows
    )
    ok, headline, section = gc.read_norm(["device: NVIDIA H200 | bf16", *table.splitlines()])
    assert ok and headline == (
        "fwd+bwd fused vs torch layer: 1.10-1.33x, rms: 0.95x; vs torch + per-example layer: 2.20-2.67x, rms: 3.00x"
    )
    assert "device: NVIDIA H200" in section and gc.markdown_table_problems(section) == []
    assert gc.read_norm(["benchmarks/norm.py: no CUDA GPU here. Nothing measured."])[0] is False
    no_fused = gc.markdown_table(
        ["norm", "variant", "pass", "speed vs torch", "speed vs torch+per-example"],
        [["rms", "torch", "fwd+bwd", "1.00", "0.40"]],
    )
    assert gc.read_norm(no_fused.splitlines())[:2] == (False, "no fwd+bwd rows of the fused variant")


def test_benchmarks_still_print_the_columns_that_are_read(gc):
    for item in gc.build_items(False, False):
        assert gc._static_check(item) == [], item.id


def test_json_result_is_read_from_the_last_result_line(gc):
    lines = [
        "noise",
        gc.BEGIN_MARK,
        "| a |",
        "|---|",
        "| 1 |",
        gc.END_MARK,
        gc.RESULT_PREFIX + '{"ok": true, "summary": "kernels on: MFU 0.41"}',
    ]
    ok, headline, section, data = gc.read_json_result(lines)
    assert ok and headline == "kernels on: MFU 0.41" and section == "| a |\n|---|\n| 1 |" and data["ok"]
    assert gc.read_json_result(["Traceback ...", "RuntimeError: boom"])[0] is False


# ------------------------------------------------------------------------------------------ running


def _item(gc: ModuleType, run_id: str, code: str, kind: str = "text") -> object:
    return gc.Item(run_id, int(run_id[0]), f"fake {run_id}", ("{python}", "-c", code), kind, "1 s")


def test_runs_carry_on_after_a_failure_and_a_timeout(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_RUN_S", 0.5)
    monkeypatch.setattr(gc, "END_RESERVE_S", 0.0)
    planned = [
        (_item(gc, "1", "print('monitor 1.01x'); print('| a | b |')"), 1.0),
        (_item(gc, "2", "import sys; print('about to fail'); sys.exit(3)"), 1.0),
        (_item(gc, "3", "import time; print('started', flush=True); time.sleep(60)"), 1.0),
        (_item(gc, "4", "print('monitor after the timeout')"), 1.0),
    ]
    started = time.monotonic()
    outcomes = gc.run_items(
        planned, tmp_path / "out", {"device": "fake"}, budget_s=6.0, started=started, on_progress=lambda _: None
    )
    took = time.monotonic() - started
    assert [o.status.split(" (")[0] for o in outcomes][:2] == ["ok", "failed"]
    assert outcomes[1].rc == 3
    assert outcomes[2].status.startswith("timed out") and outcomes[2].seconds < 12
    assert outcomes[3].status == "ok" and outcomes[3].result == "monitor after the timeout"
    assert took < 12
    assert outcomes[2].granted_s > 2.0  # the time the first two runs did not use was passed on
    assert outcomes[2].granted_s + planned[3][1] <= 6.0  # but never the time planned for the run after it
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "about to fail" in log and "started" in log and "===== 3: timed out" in log
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert gc.markdown_table_problems(report) == []
    assert "failed (exit 3)" in report and "timed out at" in report
    assert (tmp_path / "out" / "gpu_check.json").is_file()


def test_a_run_left_without_time_is_skipped_not_started(gc, tmp_path):
    planned = [(_item(gc, "1", "print('ne' + 'ver')"), 30.0), (_item(gc, "2", "print('monitor ran')"), 30.0)]
    outcomes = gc.run_items(planned, tmp_path, {}, budget_s=20.0, started=time.monotonic(), on_progress=lambda _: None)
    assert outcomes[0].status == "skipped: budget spent" and outcomes[0].rc is None
    assert "never" not in (tmp_path / "gpu_check.log").read_text()
    assert outcomes[1].status == "ok"  # the skipped run's time goes to the next


def test_runs_get_no_triton_interpreter(gc, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env, notes = gc.child_environment()
    assert "TRITON_INTERPRET" not in env and env["PYTHONUNBUFFERED"] == "1"
    assert notes and "TRITON_INTERPRET" in notes[0]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_exits_2_with_one_line_naming_the_gpu(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU" in lines[0] and "--dry-run" in lines[0]
    assert not out.exists()


def test_without_out_or_with_a_bad_budget_it_names_the_flag():
    for args, flag in (
        (["--budget-s", "480"], "--out"),
        (["--dry-run", "--budget-s", "10"], "--budget-s"),
        (["--dry-run", "--budget-s", "soon"], "--budget-s"),
    ):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2 and flag in done.stderr, (args, done.stderr)
