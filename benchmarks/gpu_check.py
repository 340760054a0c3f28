"""The GPU check as one prepared run: kernel correctness, kernel speed, MFU, the callbacks' cost on a GPU.

Runs, in this order (most important first), each as a subprocess with its own time limit, carrying on to the
next when one fails or runs out of time, and recording that:

1. ``pytest tests/kernels/test_gpu.py``: the Triton kernels on the real compiler (bf16/fp16/fp32, causal and
   full). With pytest-xdist installed, 8 workers (the compiles run in parallel); with pytest-timeout, 120 s per
   test.
2. ``benchmarks/attention.py --markdown``, causal (2a) and ``--full`` (2b): ours vs SDPA flash, forward,
   backward, forward+backward, head dim 64/128, sequence 1k-16k; model FLOPs (forward 4·B·H·S²·D, halved when
   causal; backward 2 × forward), speed ratio, peak memory.
3. ``benchmarks/mlp.py --markdown``: eager vs both SwiGLU fusions, d_model 1024/2048/4096.
4. ``benchmarks/gpu_mfu.py mfu``: the example GPT, bf16-mixed, 100 steps, kernels on and off: MFU as
   ``FlopCounter`` logs it against the analytic FLOPs over CUDA-event step times, and the dense peak the
   hardware table finds for the device.
5. ``benchmarks/callback_overhead.py --device cuda`` (5a, extra arguments in ``CALLBACK_OVERHEAD_ARGS``) and
   ``benchmarks/gpu_mfu.py syncs`` (5b): host synchronisations per optimizer step with ScalingMonitor on vs off.
6. ``benchmarks/norm.py --markdown``: the fused LayerNorm/RMSNorm with per-example squared gradient norms vs
   torch's norm alone and with a separate per-example computation, H 1024/4096/8192; its bf16 errors against
   float64 (it exits 1 when the fused norms or gradients are off).

Writes ``OUT/gpu_check.md`` (environment, one row per run with its time limit, time taken, status and headline
result, then each run's own tables), ``OUT/gpu_check.log`` (everything every run printed) and
``OUT/gpu_check.json``, all rewritten after every run so that a run cut short still leaves them. Nothing is
estimated in place of a measurement: a run that fails or times out says so and its cells stay empty.

Time: ``--budget-s`` (default 480) covers the whole script. Each run gets a planned limit, its share of the
budget (``PLAN_SHARES``, printed by ``--dry-run``) after a reserve for probing the environment and writing the
report; a run that ends early passes its unused time on to the runs after it, never taking theirs.

    python benchmarks/gpu_check.py --dry-run                   # any machine, a few seconds: the plan
    python benchmarks/gpu_check.py --out DIR [--budget-s 480]  # on a CUDA GPU
    python benchmarks/gpu_check.py --out DIR --only 2b,4       # a second try of some runs

Exit codes: 0 every run passed; 1 a run failed or timed out; 2 no CUDA GPU (or bad arguments).

On this workplace's H200 machine (the device tool; torch, triton, lightning, torchmetrics, scipy, pytest,
pytest-xdist and transformers are installed there; nothing can be downloaded), the next session runs, from the
repository root, one call::

    run(command="python3 -m pip install -q --no-deps --no-build-isolation . && PYTHONUNBUFFERED=1 python3 "
                "benchmarks/gpu_check.py --out $OUT --budget-s 480", timeout_s=560)

The install is needed: the kernels import as ``lightning_scaling.kernels`` only once installed. The machine start
(1-2 min), the install (under a minute) and the 480 s budget leave about 4 minutes of the 15 for a second try:
rerun at once, while the machine is still warm (30 s), only the runs that failed, for example
``--only 2b,5 --budget-s 180`` with ``timeout_s=220``, then ``give_back``. The three files come back under the
reply's ``files_at``; the reply's output tail ends with the summary table.

Planned limits at the default budget, and what each run should take (estimates from the work each does, not yet
measured on the machine; a run that ends early passes its time on): 1: 145 s (60-150 s: about 70 tests, each new
kernel specialisation compiled and autotuned, 8 workers; torch.compile twice); 2a: 50 s (30-50 s: 10 shapes, 2
implementations, 3 passes, autotuning per shape); 2b: 40 s (20-40 s); 3: 60 s (30-60 s: the GEMM fusion autotunes
at 3 shapes); 4: 65 s (35-60 s: two fits of 100 steps of a 100M-parameter model, about 11 TFLOP per step, and a
matmul ceiling); 5a: 35 s (25-40 s); 5b: 25 s (15-25 s); 6: 40 s (20-40 s: 6 shapes, about 20 kernel compiles, 4
variants, 3 passes, a float64 reference per shape). If run 1 is cut at its limit, the tests that finished are
still counted and the slowest are listed: give it more with ``--only 1 --budget-s 300`` in a later session.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

# Extra arguments for benchmarks/callback_overhead.py (after --device cuda).
CALLBACK_OVERHEAD_ARGS: tuple[str, ...] = ("--steps", "60", "--repeats", "2", "--only", "gpt-acc2,llama-pad30")

DEFAULT_BUDGET_S = 480.0
MIN_BUDGET_S = 60.0
# Share of the budget each run plans for, as seconds at the default budget (scaled with --budget-s).
PLAN_SHARES: dict[str, float] = {"1": 145, "2a": 50, "2b": 40, "3": 60, "4": 65, "5a": 35, "5b": 25, "6": 40}
RESERVE_FRACTION = 0.04  # of the budget, at least RESERVE_MIN_S: probing the environment, writing the report
RESERVE_MIN_S = 15.0
END_RESERVE_S = 5.0  # kept back at the end for the report
MIN_RUN_S = 5.0  # a run granted less than this is skipped
PYTEST_WORKERS = 8
PYTEST_TEST_TIMEOUT_S = 120
LOG_CAP_BYTES = 4 * 2**20  # per run, in the log
TAIL_LINES = 400
REQUIRED_MODULES = ("torch", "triton", "lightning", "lightning_scaling", "pytest", "numpy", "scipy")
RESULT_PREFIX = "GPU_CHECK_RESULT "
# The columns of the benchmarks' tables that the headline of a run is read from.
COLUMNS_READ: dict[str, tuple[str, ...]] = {
    "attention": ("head_dim", "pass", "speed ours/sdpa"),
    "mlp": ("variant", "pass", "speed vs eager", "act mem vs eager"),
    "norm": ("norm", "variant", "pass", "speed vs torch", "speed vs torch+per-example"),
}
BEGIN_MARK = "<!-- gpu_check:begin -->"
END_MARK = "<!-- gpu_check:end -->"


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Item:
    """One run of the check. ``argv`` is relative to the repository root; ``"{python}"`` stands for the
    interpreter. ``kind`` picks how its output is read: pytest, attention, mlp, norm, json (gpu_mfu.py), text."""

    id: str
    number: int
    title: str
    argv: tuple[str, ...]
    kind: str
    expected: str  # what it should take (an estimate, stated in the plan)


@dataclass
class Outcome:
    """What one run did. Seconds of wall-clock time; ``status`` is ok, failed, timed out, skipped or no result."""

    item: Item
    planned_s: float
    granted_s: float | None = None
    seconds: float | None = None
    rc: int | None = None
    status: str = "pending"
    result: str = ""
    section: str = ""
    data: Any = None
    output_head: list[str] = field(default_factory=list)  # the lines that went into the log
    output_tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))  # the last lines
    lines_total: int = 0

    def output_lines(self) -> list[str]:
        """The run's output: all of it, or what the log kept, "[...]" and the last lines after it."""
        if self.lines_total == len(self.output_head):
            return list(self.output_head)
        first_tail_line = self.lines_total - len(self.output_tail)
        skip = max(0, len(self.output_head) - first_tail_line)
        return [*self.output_head, "[...]", *list(self.output_tail)[skip:]]


def build_items(pytest_xdist: bool, pytest_timeout: bool) -> list[Item]:
    """The runs, in order. ``pytest_xdist``/``pytest_timeout``: whether those pytest plugins are installed."""
    # -P (Python >= 3.11): the repository root stays off sys.path, so `lightning_scaling` is the installed package
    # (which has .kernels), not the source folder of the same name.
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    pytest_argv = [
        "{python}",
        *safe_path,
        "-m",
        "pytest",
        "tests/kernels/test_gpu.py",
        "-v",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "--durations=10",
    ]
    if pytest_xdist:
        pytest_argv += ["-n", str(PYTEST_WORKERS)]
    if pytest_timeout:
        pytest_argv += [f"--timeout={PYTEST_TEST_TIMEOUT_S}"]
    return [
        Item("1", 1, "Kernel correctness on the real compiler", tuple(pytest_argv), "pytest", "60-150 s"),
        Item(
            "2a",
            2,
            "Attention: ours vs SDPA flash, causal",
            ("{python}", "benchmarks/attention.py", "--markdown"),
            "attention",
            "30-50 s",
        ),
        Item(
            "2b",
            2,
            "Attention: ours vs SDPA flash, full",
            ("{python}", "benchmarks/attention.py", "--markdown", "--full"),
            "attention",
            "20-40 s",
        ),
        Item(
            "3",
            3,
            "SwiGLU MLP: eager vs both fusions",
            ("{python}", "benchmarks/mlp.py", "--markdown"),
            "mlp",
            "30-60 s",
        ),
        Item(
            "4",
            4,
            "Example GPT MFU: callback vs hand, kernels on/off",
            ("{python}", "benchmarks/gpu_mfu.py", "mfu"),
            "json",
            "35-60 s",
        ),
        Item(
            "5a",
            5,
            "Callback overhead on the GPU",
            ("{python}", "benchmarks/callback_overhead.py", "--device", "cuda", *CALLBACK_OVERHEAD_ARGS),
            "text",
            "25-40 s",
        ),
        Item(
            "5b",
            5,
            "Host syncs per optimizer step, ScalingMonitor on/off",
            ("{python}", "benchmarks/gpu_mfu.py", "syncs"),
            "json",
            "15-25 s",
        ),
        Item(
            "6",
            6,
            "Norms with per-example gradient norms: fused vs torch",
            ("{python}", "benchmarks/norm.py", "--markdown"),
            "norm",
            "20-40 s",
        ),
    ]


def select_items(items: list[Item], only: str | None) -> list[Item]:
    """The runs named by ``only`` ("2b,4": run ids, or item numbers meaning all their runs); all when None.

    Raises ``ValueError`` naming ``--only`` and the allowed values when a name matches nothing.
    """
    if only is None:
        return list(items)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    allowed = sorted({i.id for i in items} | {str(i.number) for i in items})
    unknown = [w for w in wanted if w not in allowed]
    if not wanted or unknown:
        raise ValueError(f"--only takes a comma-separated list of {', '.join(allowed)}; got {only!r}")
    return [i for i in items if i.id in wanted or str(i.number) in wanted]


def reserve_seconds(budget_s: float) -> float:
    """Seconds of the budget kept for probing the environment and writing the report."""
    return max(RESERVE_MIN_S, RESERVE_FRACTION * budget_s)


def plan(items: list[Item], budget_s: float) -> list[tuple[Item, float]]:
    """Each run with its planned time limit in whole seconds; together at most ``budget_s`` minus the reserve.

    Raises ``ValueError`` naming ``budget_s`` when it is below ``MIN_BUDGET_S`` or leaves a run under
    ``MIN_RUN_S``.
    """
    if not budget_s >= MIN_BUDGET_S:
        raise ValueError(f"budget_s must be at least {MIN_BUDGET_S:.0f} seconds, got {budget_s!r}")
    available = budget_s - reserve_seconds(budget_s)
    total_share = sum(PLAN_SHARES[i.id] for i in items)
    planned = [(i, float(int(available * PLAN_SHARES[i.id] / total_share))) for i in items]
    short = [i.id for i, s in planned if s < MIN_RUN_S]
    if short:
        raise ValueError(
            f"budget_s={budget_s:g} leaves runs {', '.join(short)} under {MIN_RUN_S:.0f} s each; "
            "raise it or pick fewer runs with --only"
        )
    return planned


def display_command(item: Item) -> str:
    """The command as a person would type it (``python`` for the interpreter)."""
    text = " ".join("python" if a == "{python}" else a for a in item.argv)
    return text.replace("python -P -m pytest", "pytest").replace("python -m pytest", "pytest")


# ------------------------------------------------------------------------------------------ markdown tables


def _cell(value: object) -> str:
    text = " ".join(str(value).split())  # no newlines inside a cell
    return text.replace("|", "\\|") if text else " "


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table. Pipes in cells are escaped and newlines folded, so every row has
    exactly ``len(header)`` cells. Raises ``ValueError`` when a row has another number of cells."""
    if not header:
        raise ValueError("header must name at least one column")
    for n, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"rows[{n}] has {len(row)} cells, the header {len(header)}")
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _split_row(line: str) -> list[str]:
    body = line.strip()[1:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def markdown_table_problems(text: str) -> list[str]:
    """What is wrong with the Markdown tables in ``text``: rows whose cell count differs from their header, a
    header without its ``|---|`` line, a table line that does not start and end with a pipe. Fenced code blocks
    are not tables. Empty when fine."""
    problems: list[str] = []
    lines = text.splitlines()
    fenced = False
    for n, line in enumerate(lines):  # blank out code blocks, keeping line numbers
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines[n] = ""
        elif fenced:
            lines[n] = ""
    n = 0
    while n < len(lines):
        if not lines[n].lstrip().startswith("|"):
            n += 1
            continue
        start = n
        block = []
        while n < len(lines) and lines[n].lstrip().startswith("|"):
            block.append(lines[n])
            n += 1
        for k, line in enumerate(block):
            if not line.rstrip().endswith("|") or line.rstrip().endswith("\\|"):
                problems.append(f"line {start + k + 1}: a table line must end with an unescaped pipe")
        if len(block) < 2 or not re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", block[1].strip()):
            problems.append(f"line {start + 1}: a table header must be followed by a |---| line")
            continue
        width = len(_split_row(block[0]))
        if len(_split_row(block[1])) != width:
            problems.append(f"line {start + 2}: separator has {len(_split_row(block[1]))} cells, header {width}")
        for k, line in enumerate(block[2:], start=start + 3):
            if len(_split_row(line)) != width:
                problems.append(f"line {k}: {len(_split_row(line))} cells, header {width}")
    return problems


def parse_markdown_table(lines: list[str], must_have: str) -> tuple[list[str], list[list[str]]] | None:
    """The first table whose header has a column named ``must_have``: (header, rows), or None."""
    for n, line in enumerate(lines):
        if line.startswith("|") and must_have in _split_row(line):
            header = _split_row(line)
            rows = []
            for row_line in lines[n + 2 :]:
                if not row_line.startswith("|"):
                    break
                rows.append(_split_row(row_line))
            return header, rows
    return None


# ------------------------------------------------------------------------------------------ reading results


def _code_block(lines: list[str]) -> str:
    return "```text\n" + "\n".join(lines) + "\n```" if lines else ""


def read_pytest(lines: list[str]) -> tuple[bool, str, str]:
    """(passed, headline, section) from pytest -v output (also when cut short)."""
    outcomes: dict[str, str] = {}
    for line in lines:
        test = re.search(r"(\S+\.py::\S+)", line)
        word = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if test and word:
            outcomes[test.group(1)] = word.group(1)
    summary = next(
        (
            m.group(1)
            for line in reversed(lines)
            if (m := re.match(r"^=+ (.*\d+ (?:passed|failed|error|errors|skipped|deselected).*) =+$", line.strip()))
        ),
        None,
    )
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    bad = sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR"))
    passed = counts.get("PASSED", 0)
    headline = summary or (
        ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) + " (cut short)" if counts else "no test ran"
    )
    section = [f"pytest: {headline}"]
    if bad:
        section += ["", "Failed:", *[f"- `{t}`" for t in bad[:30]]]
    durations = []
    grab = False
    for line in lines:
        if "slowest" in line and "durations" in line:
            grab = True
            continue
        if grab:
            if not line.strip() or line.startswith("="):
                break
            durations.append(line.rstrip())
    if durations:
        section += ["", "Slowest:", _code_block(durations)]
    ok = passed > 0 and not bad and summary is not None
    if bad:
        headline = f"{headline}; failed: {', '.join(t.split('::')[-1] for t in bad[:3])}" + (
            " ..." if len(bad) > 3 else ""
        )
    return ok, headline, "\n".join(section)


def _table_section(lines: list[str], must_have: str) -> tuple[tuple[list[str], list[list[str]]] | None, str]:
    table = parse_markdown_table(lines, must_have)
    kept = [line for line in lines if line.startswith("device:")][:1]
    if table is not None:
        start = next(n for n, line in enumerate(lines) if line.startswith("|") and must_have in _split_row(line))
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        kept += ["", *lines[start:end]]
    return table, "\n".join(kept)


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}" if min(values) == max(values) else f"{min(values):.2f}-{max(values):.2f}"


def read_attention(lines: list[str]) -> tuple[bool, str, str]:
    """(has a table, headline, section) from benchmarks/attention.py --markdown."""
    column = "speed ours/sdpa"
    table, section = _table_section(lines, column)
    if table is None:
        return False, "no result table in the output", section
    header, rows = table
    try:
        hd, pas, speed = (header.index(c) for c in COLUMNS_READ["attention"])
        by_dim: dict[str, list[float]] = {}
        for row in rows:
            if row[pas] == "fwd+bwd":
                by_dim.setdefault(row[hd], []).append(float(row[speed]))
    except (ValueError, IndexError):
        return False, "result table not in the expected columns", section
    if not by_dim:
        return False, "no fwd+bwd rows", section
    shapes = sum(len(v) for v in by_dim.values())
    headline = "fwd+bwd ours/SDPA " + ", ".join(f"hd{d}: {_range(v)}x" for d, v in by_dim.items())
    return True, f"{headline} ({shapes} shapes)", section


def read_mlp(lines: list[str]) -> tuple[bool, str, str]:
    """(has a table, headline, section) from benchmarks/mlp.py --markdown."""
    column = "speed vs eager"
    table, section = _table_section(lines, column)
    if table is None:
        return False, "no result table in the output", section
    header, rows = table
    try:
        var, pas, speed, mem = (header.index(c) for c in COLUMNS_READ["mlp"])
        speeds: dict[str, list[str]] = {}
        mems: dict[str, list[str]] = {}
        for row in rows:
            if row[pas] == "fwd+bwd" and row[var] != "eager":
                name = row[var].replace("fused ", "")
                speeds.setdefault(name, []).append(row[speed])
                mems.setdefault(name, []).append(row[mem])
    except (ValueError, IndexError):
        return False, "result table not in the expected columns", section
    if not speeds:
        return False, "no fwd+bwd rows", section
    headline = "fwd+bwd vs eager " + ", ".join(f"{n}: {'/'.join(v)}x" for n, v in speeds.items())
    headline += "; act mem " + ", ".join(f"{n}: {'/'.join(v)}x" for n, v in mems.items())
    return True, headline, section


def read_norm(lines: list[str]) -> tuple[bool, str, str]:
    """(has a table, headline, section) from benchmarks/norm.py --markdown: the fused variant's forward+backward
    speed against torch's norm alone and against torch's norm with a separate per-example computation."""
    column = "speed vs torch+per-example"
    table, section = _table_section(lines, column)
    if table is None:
        return False, "no result table in the output", section
    header, rows = table
    try:
        kind, var, pas, alone, with_norms = (header.index(c) for c in COLUMNS_READ["norm"])
        speeds: dict[str, tuple[list[float], list[float]]] = {}
        for row in rows:
            if row[pas] == "fwd+bwd" and row[var] == "fused":
                pair = speeds.setdefault(row[kind], ([], []))
                pair[0].append(float(row[alone]))
                pair[1].append(float(row[with_norms]))
    except (ValueError, IndexError):
        return False, "result table not in the expected columns", section
    if not speeds:
        return False, "no fwd+bwd rows of the fused variant", section
    headline = (
        "fwd+bwd fused vs torch "
        + ", ".join(f"{k}: {_range(v[0])}x" for k, v in speeds.items())
        + "; vs torch + per-example "
        + ", ".join(f"{k}: {_range(v[1])}x" for k, v in speeds.items())
    )
    return True, headline, section


def read_json_result(lines: list[str]) -> tuple[bool, str, str, Any]:
    """(ok, headline, section, data) from a gpu_mfu.py run: its marked Markdown and its result line."""
    data = None
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            try:
                data = json.loads(line[len(RESULT_PREFIX) :])
            except json.JSONDecodeError:
                data = None
            break
    section_lines: list[str] = []
    if BEGIN_MARK in lines and END_MARK in lines:
        section_lines = lines[lines.index(BEGIN_MARK) + 1 : lines.index(END_MARK)]
    section = "\n".join(section_lines).strip()
    if data is None:
        return False, "no result line in the output", section, None
    return bool(data.get("ok")), str(data.get("summary", "")), section, data


def read_text(lines: list[str]) -> tuple[bool, str, str]:
    """(ok, headline, section) for a script whose output format is not fixed: its last lines, verbatim."""
    tail = [line for line in lines if line.strip()][-30:]
    headline = next((line.strip() for line in reversed(tail) if line.lstrip().startswith("monitor")), "")
    return bool(tail), " ".join(headline.split()) or "see its section", _code_block(tail)


def read_outcome(outcome: Outcome, lines: list[str], timed_out: bool) -> None:
    """Fill ``status``, ``result`` and ``section`` of a finished run from its output and exit code."""
    kind = outcome.item.kind
    if kind == "pytest":
        ok, headline, section = read_pytest(lines)
    elif kind == "attention":
        ok, headline, section = read_attention(lines)
    elif kind == "mlp":
        ok, headline, section = read_mlp(lines)
    elif kind == "norm":
        ok, headline, section = read_norm(lines)
    elif kind == "json":
        ok, headline, section, outcome.data = read_json_result(lines)
    else:
        ok, headline, section = read_text(lines)
    if timed_out:
        outcome.status = f"timed out at {outcome.granted_s:.0f} s"
    elif outcome.rc != 0:
        outcome.status = f"failed (exit {outcome.rc})"
    elif not ok:
        outcome.status = "no result"
    else:
        outcome.status = "ok"
    outcome.result = headline
    if outcome.status != "ok" and kind != "text":  # a text run's section is its last lines already
        tail = [line for line in lines if line.strip()][-25:]
        section = (section + "\n\nLast lines of its output:\n" + _code_block(tail)).strip()
    outcome.section = section


# ------------------------------------------------------------------------------------------ running


def run_command(
    argv: list[str], limit_s: float, log: Any, cwd: Path, env: dict[str, str], outcome: Outcome
) -> tuple[int | None, bool, float]:
    """Run ``argv`` in its own process group for at most ``limit_s`` seconds, copying its output (stdout and
    stderr) into ``log`` (up to ``LOG_CAP_BYTES``) and into ``outcome.output_head``/``output_tail``.

    Returns (exit code, timed out, seconds). At the limit the whole group gets SIGTERM, then SIGKILL 5 s later.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    written = [0]

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            outcome.output_tail.append(line)
            outcome.lines_total += 1
            if written[0] < LOG_CAP_BYTES:
                outcome.output_head.append(line)
                log.write(line + "\n")
                written[0] += len(line) + 1
                if written[0] >= LOG_CAP_BYTES:
                    log.write(f"[log cut at {LOG_CAP_BYTES} bytes; the rest of this run's output is left out]\n")
                log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(limit_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(proc)
    except BaseException:
        _stop_group(proc)
        raise
    reader.join(timeout=10)
    return proc.returncode, timed_out, time.monotonic() - started


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this run started (its id is the child's pid), SIGKILL it if still there."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def child_environment() -> tuple[dict[str, str], list[str]]:
    """The environment for the runs, and notes on what was changed: unbuffered output; TRITON_INTERPRET removed
    (it would run the kernels in Triton's CPU interpreter)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    notes = []
    if "TRITON_INTERPRET" in env:
        notes.append(f"TRITON_INTERPRET={env.pop('TRITON_INTERPRET')} was set; removed for the runs")
    return env, notes


def run_items(
    planned: list[tuple[Item, float]],
    out_dir: Path,
    env_facts: dict[str, Any],
    budget_s: float,
    started: float,
    python: str = sys.executable,
    on_progress: Callable[[str], None] | None = None,
) -> list[Outcome]:
    """Run the planned items in order within ``budget_s`` seconds counted from ``started`` (``time.monotonic``),
    writing the log and the report into ``out_dir`` after each; ``on_progress`` gets one line per start and end
    (default: printed). Returns what each run did."""
    if on_progress is None:

        def on_progress(line: str) -> None:
            print(line, flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    env, notes = child_environment()
    outcomes = [Outcome(item, planned_s) for item, planned_s in planned]
    deadline = started + budget_s - END_RESERVE_S
    with open(out_dir / "gpu_check.log", "w", encoding="utf-8") as log:
        log.write("environment: " + json.dumps(env_facts, sort_keys=True) + "\n")
        log.writelines(f"note: {note}\n" for note in notes)
        log.write(render_plan(planned, budget_s) + "\n")
        write_report(out_dir, env_facts, outcomes, budget_s, time.monotonic() - started, notes)
        for n, outcome in enumerate(outcomes):
            later = sum(o.planned_s for o in outcomes[n + 1 :])
            granted = deadline - time.monotonic() - later
            item = outcome.item
            argv = [python if a == "{python}" else a for a in item.argv]
            log.write(
                f"\n===== {item.id}. {item.title}: {display_command(item)} "
                f"(planned {outcome.planned_s:.0f} s, granted {max(granted, 0):.0f} s) =====\n"
            )
            log.flush()
            if granted < MIN_RUN_S:
                outcome.status = "skipped: budget spent"
                outcome.granted_s = max(granted, 0.0)
                log.write("skipped: no time left in the budget\n")
            else:
                outcome.granted_s = granted
                on_progress(f"[{item.id}] {item.title}: up to {granted:.0f} s ...")
                rc, timed_out, seconds = run_command(argv, granted, log, REPO, env, outcome)
                outcome.rc, outcome.seconds = rc, seconds
                read_outcome(outcome, outcome.output_lines(), timed_out)
                log.write(f"===== {item.id}: {outcome.status} in {seconds:.1f} s (exit {rc}) =====\n")
            log.flush()
            on_progress(f"[{item.id}] {outcome.status}: {outcome.result}")
            write_report(out_dir, env_facts, outcomes, budget_s, time.monotonic() - started, notes)
    return outcomes


# ------------------------------------------------------------------------------------------ the report


def render_plan(planned: list[tuple[Item, float]], budget_s: float) -> str:
    """The plan as a Markdown table, with the total against the budget."""
    rows = [[i.id, i.title, f"`{display_command(i)}`", f"{s:.0f}", i.expected] for i, s in planned]
    total = sum(s for _, s in planned)
    return (
        markdown_table(["run", "what", "command", "time limit s", "should take (estimate)"], rows)
        + f"\n\ntotal planned: {total:.0f} s of {budget_s:.0f} s budget "
        f"({budget_s - total:.0f} s kept for the environment probe and the report)"
    )


def render_report(
    env: dict[str, Any], outcomes: list[Outcome], budget_s: float, elapsed_s: float, notes: list[str] | None = None
) -> str:
    """The whole ``gpu_check.md``: environment facts, one row per run, then each run's own tables."""
    facts = [
        ["device", env.get("device", "n/a")],
        ["driver", env.get("driver", "n/a")],
        ["CUDA (torch build)", env.get("cuda", "n/a")],
        ["torch", env.get("torch", "n/a")],
        ["triton", env.get("triton", "n/a")],
        ["lightning", env.get("lightning", "n/a")],
        ["lightning-scaling", env.get("lightning_scaling", "n/a")],
        ["python", env.get("python", "n/a")],
        ["GPU at start", env.get("gpu_state", "n/a")],
        ["date (UTC)", env.get("date", "n/a")],
        ["budget", f"{budget_s:.0f} s, {elapsed_s:.0f} s used"],
    ]
    facts += [["note", note] for note in (notes or [])]
    rows = []
    for o in outcomes:
        rows.append(
            [
                o.item.id,
                o.item.title,
                f"`{display_command(o.item)}`",
                f"{o.planned_s:.0f}",
                "" if o.granted_s is None else f"{o.granted_s:.0f}",
                "" if o.seconds is None else f"{o.seconds:.0f}",
                o.status,
                o.result,
            ]
        )
    parts = [
        f"# GPU check: {env.get('device', 'unknown device')}, {env.get('date', '')}",
        "",
        markdown_table(["fact", "value"], facts),
        "",
        markdown_table(["run", "what", "command", "limit s", "granted s", "took s", "status", "result"], rows),
    ]
    for o in outcomes:
        if o.section:
            parts += [
                "",
                f"## {o.item.id}. {o.item.title}",
                "",
                f"`{display_command(o.item)}`: {o.status}",
                "",
                o.section,
            ]
    return "\n".join(parts) + "\n"


def write_report(
    out_dir: Path,
    env: dict[str, Any],
    outcomes: list[Outcome],
    budget_s: float,
    elapsed_s: float,
    notes: list[str] | None = None,
) -> None:
    """Write ``gpu_check.md`` and ``gpu_check.json`` into ``out_dir`` (atomically: a reader never sees half)."""
    report = render_report(env, outcomes, budget_s, elapsed_s, notes)
    data = {
        "environment": env,
        "budget_s": budget_s,
        "elapsed_s": elapsed_s,
        "notes": notes or [],
        "runs": [
            {
                "id": o.item.id,
                "item": o.item.number,
                "title": o.item.title,
                "command": display_command(o.item),
                "planned_s": o.planned_s,
                "granted_s": o.granted_s,
                "seconds": o.seconds,
                "exit_code": o.rc,
                "status": o.status,
                "result": o.result,
                "data": o.data,
            }
            for o in outcomes
        ],
    }
    for name, text in (("gpu_check.md", report), ("gpu_check.json", json.dumps(data, indent=1, default=str))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)


# ------------------------------------------------------------------------------------------ environment


def probe_environment() -> dict[str, Any]:
    """Facts about this machine for the report header. Imports torch first and stops there without CUDA."""
    facts: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
    }
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        facts["error"] = f"torch does not import: {type(err).__name__}: {err}"
        facts["cuda_available"] = False
        return facts
    facts["torch"] = torch.__version__
    facts["cuda"] = torch.version.cuda or "none"
    facts["cuda_available"] = bool(torch.cuda.is_available())
    if not facts["cuda_available"]:
        return facts
    props = torch.cuda.get_device_properties(0)
    facts["device"] = (
        f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.1f} GiB), {torch.cuda.device_count()} visible"
    )
    for name in ("triton", "lightning"):
        try:
            facts[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001
            facts[name] = f"does not import ({type(err).__name__})"
    try:
        import lightning_scaling

        facts["lightning_scaling"] = lightning_scaling.__version__
        importlib.import_module("lightning_scaling.kernels.ops.attention")
    except Exception as err:  # noqa: BLE001
        facts["lightning_scaling"] = (
            f"{facts.get('lightning_scaling', '?')}; kernels do not import: {type(err).__name__}: {err}"
        )
    facts["driver"], facts["gpu_state"] = _nvidia_smi()
    commit = _git_commit()
    if commit:
        facts["lightning_scaling"] = f"{facts['lightning_scaling']} (commit {commit})"
    return facts


def _nvidia_smi() -> tuple[str, str]:
    query = "driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.splitlines()[0]
        driver, used, total, sm, sm_max, temp, util = (v.strip() for v in out.split(","))
    except Exception as err:  # noqa: BLE001
        return "n/a", f"nvidia-smi failed ({type(err).__name__})"
    return driver, (f"{used}/{total} MiB used, SM clock {sm}/{sm_max} MHz, {temp} C, {util}% busy")


def _git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001 - the copy on the GPU machine may have no .git
        return None


def _probe_in_subprocess(timeout_s: float = 60.0) -> dict[str, Any]:
    """The environment probe in a child process, so that this one never holds a CUDA context."""
    try:
        done = subprocess.run(
            [sys.executable, str(THIS), "--probe-env"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"cuda_available": False, "error": f"the environment probe took over {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"cuda_available": False, "error": f"the environment probe failed: {done.stderr.strip()[-300:]}"}


# ------------------------------------------------------------------------------------------ dry run


def _fake_outcomes(items: list[tuple[Item, float]]) -> list[Outcome]:
    fake = []
    for n, (item, planned_s) in enumerate(items):
        o = Outcome(item, planned_s, granted_s=planned_s, seconds=planned_s / 2, rc=0 if n % 3 else 1)
        o.status = "ok" if n % 3 else "failed (exit 1)"
        o.result = "fake | result with a pipe"
        o.section = markdown_table(["a", "b"], [["1", "x|y"], ["2", "multi\nline"]])
        fake.append(o)
    return fake


def dry_run(planned: list[tuple[Item, float]], budget_s: float) -> int:
    """Print the plan and check what can be checked without a GPU. Returns the exit code."""
    problems = []
    print("gpu_check dry run: nothing runs on a GPU.\n")
    print(render_plan(planned, budget_s))
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    optional = {
        name: importlib.util.find_spec(mod) is not None
        for name, mod in (("pytest-xdist", "xdist"), ("pytest-timeout", "pytest_timeout"))
    }
    print(
        f"\nimports: {', '.join(m for m in REQUIRED_MODULES if m not in missing)} found"
        + (f"; MISSING: {', '.join(missing)}" if missing else "")
    )
    print(
        "optional: "
        + ", ".join(f"{k} {'found' if v else 'not found (item 1 runs without it)'}" for k, v in optional.items())
    )
    problems += [f"{m} is not installed" for m in missing]
    name = "gpu_check_dry_run_gpu_mfu"
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "gpu_mfu.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        module.RunShape(**vars(module.MFU_SHAPE))  # the shape it will train validates
        print("benchmarks/gpu_mfu.py: loads")
    except Exception as err:  # noqa: BLE001
        problems.append(f"benchmarks/gpu_mfu.py does not load: {type(err).__name__}: {err}")
    finally:
        sys.modules.pop(name, None)
    for item, _ in planned:
        problems += _static_check(item)
    if not (REPO / "examples" / "gpt.py").is_file():
        problems.append("examples/gpt.py is missing")
    report = render_report(
        {"device": "FAKE (dry run)", "date": "-"},
        _fake_outcomes(planned),
        budget_s,
        0.0,
        ["fake rows: the table writer exercised"],
    )
    table_problems = markdown_table_problems(report)
    problems += [f"table writer: {p}" for p in table_problems]
    print(
        f"table writer: a fake report of {len(report.splitlines())} lines, "
        f"{'well-formed' if not table_problems else 'MALFORMED'}"
    )
    if problems:
        print("\nproblems:\n" + "\n".join(f"- {p}" for p in problems))
        return 1
    print("\ndry run: ok")
    return 0


def _static_check(item: Item) -> list[str]:
    """The script or test file each run needs exists, and mentions each flag passed to it and each column its
    headline is read from."""
    paths = [a for a in item.argv if a.endswith(".py")]
    if not paths:
        return []
    path = REPO / paths[0]
    if not path.is_file():
        return [f"run {item.id}: {paths[0]} is missing"]
    if item.kind == "pytest":
        return []
    text = path.read_text(encoding="utf-8")
    after = list(item.argv[item.argv.index(paths[0]) + 1 :])
    wanted = [a for a in after if a.startswith("--") or (a.isidentifier() and a == after[0])]
    wanted += COLUMNS_READ.get(item.kind, ())
    return [f"run {item.id}: {paths[0]} does not mention {a!r}" for a in wanted if f'"{a}"' not in text]


# ------------------------------------------------------------------------------------------ main


def _budget_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value >= MIN_BUDGET_S:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_BUDGET_S:.0f} seconds, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit codes: 0 all passed, 1 a run failed or timed out, 2 no CUDA GPU.",
    )
    parser.add_argument(
        "--out", type=Path, help="folder for gpu_check.md, gpu_check.log and gpu_check.json (needed unless --dry-run)"
    )
    parser.add_argument(
        "--budget-s",
        type=_budget_seconds,
        default=DEFAULT_BUDGET_S,
        help=f"seconds for the whole check, at least {MIN_BUDGET_S:.0f} (default {DEFAULT_BUDGET_S:.0f})",
    )
    parser.add_argument("--only", help="comma-separated runs to do, e.g. 2b,4 (item numbers mean all their runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the script; run nothing")
    parser.add_argument("--probe-env", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.probe_env:
        print(json.dumps(probe_environment()))
        return 0
    xdist = importlib.util.find_spec("xdist") is not None
    timeout_plugin = importlib.util.find_spec("pytest_timeout") is not None
    try:
        items = select_items(build_items(xdist, timeout_plugin), args.only)
        planned = plan(items, args.budget_s)
    except ValueError as err:
        parser.error(str(err))
    if args.dry_run:
        return dry_run(planned, args.budget_s)
    if args.out is None:
        parser.error("--out is needed to run the check (or use --dry-run)")
    env = _probe_in_subprocess()
    if not env.get("cuda_available"):
        reason = env.get("error") or "torch.cuda.is_available() is False"
        print(
            f"gpu_check: no CUDA GPU available here ({reason}); this check needs an NVIDIA GPU. "
            "--dry-run prints the plan without one.",
            file=sys.stderr,
        )
        return 2
    print(render_plan(planned, args.budget_s), flush=True)
    outcomes = run_items(planned, args.out, env, args.budget_s, started)
    print()
    report = render_report(env, outcomes, args.budget_s, time.monotonic() - started)
    print(report.split("\n## ", 1)[0])  # the header and summary table; the sections are in the file
    print(f"written: {args.out / 'gpu_check.md'}, gpu_check.log, gpu_check.json")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
