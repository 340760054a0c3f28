"""`lightning-scaling plan`: every mode, every bad input (exit 2, one line naming the flag as typed), warnings,
output into a closed pipe, the console script; and its flags fuzzed."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import (
    assert_advice_is_trainable,
    assert_clean_rejection,
    assert_finite,
    json_without_nan,
    run_cli_without_traceback,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lightning_scaling import cli
from lightning_scaling.flops.formulas import transformer_flops, transformer_params
from lightning_scaling.laws.definitions import (
    BESIROGLU_2024,
    HOFFMANN_2022,
    DataConstrainedLaw,
    KaplanLaw,
    inference_optimal,
)
from lightning_scaling.planner import plan

GPT2 = ["--n-layer", "12", "--d-model", "768", "--n-head", "12", "--vocab-size", "50257", "--seq-len", "1024"]


@pytest.fixture
def main(monkeypatch):
    """cli.main with only the plan subcommand registered, so these tests do not depend on the others."""
    monkeypatch.setattr(cli, "_COMMANDS", {"plan": cli._COMMANDS["plan"]})
    return cli.main


@pytest.fixture
def plan_json(main, capsys):
    def run(*argv):
        assert main(["plan", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    return run


def test_flops_mode(plan_json):
    out = plan_json("--flops", "1e21")
    opt = BESIROGLU_2024.compute_optimal(1e21)
    assert out["mode"] == "flops" and out["law"]["name"] == "besiroglu"
    assert out["warnings"] == []
    assert out["params"] == pytest.approx(opt.params) and out["tokens"] == pytest.approx(opt.tokens)
    assert 6 * out["params"] * out["tokens"] == pytest.approx(1e21)
    assert 18 < out["tokens_per_param"] < 25
    assert out["loss"] == pytest.approx(opt.loss)
    assert out["compute_overhead"] == pytest.approx(0, abs=1e-9)
    assert out["flops_convention"] == "6N" and out["flops_per_token"] == pytest.approx(6 * out["params"])
    assert out["data"] is out["inference"] is out["hardware"] is out["batch"] is out["model"] is None


def test_params_only_and_tokens_only(plan_json):
    by_params = plan_json("--params", "7e9")
    assert by_params["mode"] == "params" and by_params["params"] == 7e9
    assert by_params["tokens"] == pytest.approx(BESIROGLU_2024.optimal_for_params(7e9).tokens)
    assert by_params["compute_overhead"] == pytest.approx(0, abs=1e-9)
    by_tokens = plan_json("--tokens", str(by_params["tokens"]))
    assert by_tokens["mode"] == "tokens" and by_tokens["params"] == pytest.approx(7e9, rel=1e-9)


def test_params_and_tokens(plan_json):
    out = plan_json("--params", "7e9", "--tokens", "2e12")
    assert out["mode"] == "params+tokens"
    assert out["flops"] == pytest.approx(6 * 7e9 * 2e12)
    assert out["tokens_per_param"] == pytest.approx(2e12 / 7e9)
    assert out["loss"] == pytest.approx(BESIROGLU_2024.loss(7e9, 2e12))
    assert (
        out["compute_overhead"] == pytest.approx(BESIROGLU_2024.compute_overhead(7e9, 2e12))
        and out["compute_overhead"] > 0.5
    )
    same = out["same_loss_optimum"]
    assert same["loss"] == pytest.approx(out["loss"]) and same["flops"] * (
        1 + out["compute_overhead"]
    ) == pytest.approx(out["flops"])
    assert out["compute_optimum"]["loss"] < out["loss"]


def test_flops_with_params_or_tokens(plan_json):
    out = plan_json("--flops", "1e22", "--params", "1e9")
    assert out["mode"] == "flops+params" and out["tokens"] == pytest.approx(1e22 / 6e9)
    out = plan_json("--flops", "1e22", "--tokens", "1e11")
    assert out["mode"] == "flops+tokens" and out["params"] == pytest.approx(1e22 / 6e11)


def test_target_loss_and_law_choice(plan_json):
    out = plan_json("--target-loss", "2.2", "--law", "hoffmann")
    opt = HOFFMANN_2022.optimal_for_loss(2.2)
    assert out["mode"] == "target_loss" and out["law"]["name"] == "hoffmann"
    assert out["params"] == pytest.approx(opt.params) and out["loss"] == pytest.approx(2.2)
    assert plan_json("--flops", "1e21", "--law", "muennighoff")["law"]["name"] == "muennighoff"


def test_model_shape_uses_analytic_flops(plan_json):
    out = plan_json(*GPT2, "--flops", "1e19")
    per_token = transformer_flops(12, 768, 12, 1024, 50257).per_token
    assert out["mode"] == "flops+params"
    assert out["params"] == transformer_params(12, 768, 50257).total
    assert out["flops_per_token"] == pytest.approx(per_token) and out["flops_convention"] == "chinchilla"
    assert out["tokens"] == pytest.approx(1e19 / per_token)
    assert out["model"]["non_embedding_params"] == transformer_params(12, 768, 50257).non_embedding
    gated = plan_json(
        *GPT2, "--gated-mlp", "--d-ff", "2048", "--untied-embeddings", "--non-embedding", "--flops-convention", "palm"
    )
    count = transformer_params(12, 768, 50257, d_ff=2048, gated_mlp=True, tied_embeddings=False)
    assert gated["mode"] == "params" and gated["params"] == count.non_embedding
    assert gated["flops_per_token"] == pytest.approx(
        transformer_flops(12, 768, 12, 1024, 50257, d_ff=2048, gated_mlp=True, convention="palm").per_token
    )
    assert gated["flops"] == pytest.approx(gated["flops_per_token"] * gated["tokens"])


def test_unique_tokens(plan_json):
    out = plan_json("--flops", "1e22", "--unique-tokens", "5e10")
    data, law = out["data"], DataConstrainedLaw.from_chinchilla(BESIROGLU_2024)
    assert data["epochs"] == pytest.approx(out["tokens"] / 5e10)
    assert data["effective_tokens"] == pytest.approx(law.effective_tokens(out["tokens"], 5e10))
    assert data["loss"] == pytest.approx(law.loss(out["params"], out["tokens"], 5e10)) and data["loss"] > out["loss"]
    assert 0 < data["repetition_value"] < 1
    assert data["optimum"]["loss"] <= data["loss"] + 1e-12 and data["optimum"]["epochs"] > 1


def test_inference_tokens(plan_json):
    out = plan_json("--flops", "1e22", "--inference-tokens", "1e13")
    inf = out["inference"]
    alt = inference_optimal(BESIROGLU_2024, out["loss"], 1e13)
    assert inf["optimum"]["params"] == pytest.approx(alt.params) and alt.params < out["params"]
    assert inf["planned"]["inference_flops"] == pytest.approx(2 * out["params"] * 1e13)
    assert inf["saved_flops"] > 0
    assert inf["saved_flops"] == pytest.approx(inf["planned"]["total_flops"] - inf["optimum"]["total_flops"])
    assert 0 < inf["saved_fraction"] < 1


def test_law_file(plan_json, tmp_path):
    path = tmp_path / "fit.json"
    law = {**HOFFMANN_2022.to_dict(), "name": "my-fit", "n_runs": 12, "bootstrap": {"alpha": [0.3, 0.35]}}
    path.write_text(json.dumps(law))
    out = plan_json("--flops", "1e21", "--law-file", str(path))
    assert out["law"]["name"] == "my-fit" and out["law"]["source"] == str(path)
    assert out["params"] == pytest.approx(HOFFMANN_2022.compute_optimal(1e21).params)


def test_hardware_and_batch(plan_json):
    out = plan_json(
        "--flops",
        "1e21",
        "--gpu",
        "H100",
        "--num-gpus",
        "8",
        "--mfu",
        "0.5",
        "--batch-size",
        "512",
        "--seq-len",
        "2048",
    )
    hw, batch = out["hardware"], out["batch"]
    assert hw["peak_flops_per_gpu"] == 989.4e12 and hw["dtype"] == "bf16"
    assert hw["wall_clock_hours"] == pytest.approx(1e21 / (989.4e12 * 8 * 0.5) / 3600)
    assert hw["gpu_hours"] == pytest.approx(8 * hw["wall_clock_hours"])
    assert batch["tokens_per_step"] == 512 * 2048
    assert batch["steps"] == math.ceil(out["tokens"] / (512 * 2048))
    assert batch["seconds_per_step"] * batch["steps"] == pytest.approx(hw["wall_clock_hours"] * 3600)
    custom = plan_json("--flops", "1e21", "--peak-flops", "1e15")
    assert custom["hardware"]["wall_clock_hours"] == pytest.approx(1e21 / (1e15 * 0.4) / 3600)
    assert plan_json("--flops", "1e21", "--gpu", "a100", "--dtype", "fp32")["hardware"]["peak_flops_per_gpu"] == 19.5e12


def test_table_output(main, capsys):
    assert (
        main(
            [
                "plan",
                "--flops",
                "1e21",
                "--unique-tokens",
                "1e10",
                "--inference-tokens",
                "1e12",
                "--gpu",
                "h100",
                "--batch-size",
                "256",
                "--seq-len",
                "4096",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for label in (
        "parameters",
        "training tokens",
        "tokens per parameter",
        "predicted loss",
        "epochs",
        "inference-aware optimum",
        "wall-clock hours",
        "GPU-hours",
        "steps",
    ):
        assert label in text
    assert "nan" not in text.lower()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--flops", "-1"], "--flops"),
        (["--flops", "0"], "--flops"),
        (["--flops", "nan"], "--flops"),
        (["--params", "inf"], "--params"),
        (["--flops", "abc"], "--flops"),
        (["--tokens", "-5e9"], "--tokens"),
        (["--flops", "1e21", "--params", "1e9", "--tokens", "1e10"], "--tokens"),
        (["--flops", "1e21", "--target-loss", "2.5"], "--target-loss"),
        (["--target-loss", "1.5"], "--target-loss"),
        (["--flops", "1e21", "--law", "kaplan"], "--law"),
        (["--flops", "1e21", "--law", "epoch", "--law-file", "x.json"], "--law-file"),
        (["--flops", "1e21", "--law-file", "/nonexistent/law.json"], "--law-file"),
        (["--flops", "1e21", "--gpu", "tpu-v5"], "--gpu"),
        (["--flops", "1e21", "--gpu", "h100", "--peak-flops", "1e15"], "--peak-flops"),
        (["--flops", "1e21", "--mfu", "0.4"], "--mfu"),
        (["--flops", "1e21", "--num-gpus", "8"], "--num-gpus"),
        (["--flops", "1e21", "--gpu", "h100", "--mfu", "1.5"], "--mfu"),
        (["--flops", "1e21", "--gpu", "h100", "--num-gpus", "0"], "--num-gpus"),
        (["--flops", "1e21", "--gpu", "v100", "--dtype", "bf16"], "--dtype"),
        (["--flops", "1e21", "--peak-flops", "-3"], "--peak-flops"),
        (["--flops", "1e21", "--batch-size", "8"], "--seq-len"),
        (["--flops", "1e21", "--seq-len", "1024"], "--seq-len"),
        (["--flops", "1e21", "--batch-size", "0", "--seq-len", "8"], "--batch-size"),
        (["--flops", "1e21", "--unique-tokens", "-1"], "--unique-tokens"),
        (["--flops", "1e21", "--inference-tokens", "nan"], "--inference-tokens"),
        (["--flops", "1e21", "--gated-mlp"], "--gated-mlp"),
        (["--n-layer", "12", "--flops", "1e21"], "--d-model"),
        ([*GPT2, "--params", "1e9"], "--params"),
        ([*GPT2, "--flops", "1e21", "--tokens", "1e9"], "--tokens"),
        (["--n-layer", "2", "--d-model", "100", "--n-head", "3", "--vocab-size", "10", "--seq-len", "8"], "--n-head"),
        (["--n-layer", "0", "--d-model", "64", "--n-head", "2", "--vocab-size", "10", "--seq-len", "8"], "--n-layer"),
        (["--params", "1e300", "--tokens", "1e300"], "--tokens"),
        ([], "--flops"),
    ],
)
def test_bad_input_exits_2_with_one_line(main, capsys, argv, flag):
    assert _exit_code(main, ["plan", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], captured.err
    assert captured.out == ""


def _exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors (unparsable numbers, unknown choices)
        return exc.code


@pytest.mark.parametrize("content", ["{not json", json.dumps(KaplanLaw().to_dict()), '{"E": 1.7}'])
def test_bad_law_file_exits_2(main, capsys, tmp_path, content):
    path = tmp_path / "law.json"
    path.write_text(content)
    assert main(["plan", "--flops", "1e21", "--law-file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--law-file" in err and "law.json" in err


def _console_script():
    found = shutil.which("lightning-scaling") or str(Path(sys.executable).with_name("lightning-scaling"))
    assert os.path.exists(found), "the lightning-scaling console script is not installed"
    return found


@pytest.mark.slow
def test_console_script_subprocess():
    script = _console_script()
    ok = subprocess.run([script, "plan", "--flops", "1e21", "--json"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tokens_per_param"] == pytest.approx(
        BESIROGLU_2024.compute_optimal(1e21).tokens_per_param
    )
    bad = subprocess.run([script, "plan", "--flops", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--flops" in bad.stderr


@pytest.mark.slow
def test_plan_imports_no_torch():
    code = "import lightning_scaling.commands.plan, lightning_scaling.planner, sys; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_plan_grouped_query_attention_shape(capsys):
    from lightning_scaling.cli import main

    args = [
        "plan",
        "--n-layer",
        "32",
        "--d-model",
        "4096",
        "--n-head",
        "32",
        "--n-kv-head",
        "8",
        "--vocab-size",
        "128256",
        "--seq-len",
        "8192",
        "--d-ff",
        "14336",
        "--gated-mlp",
        "--untied-embeddings",
        "--tokens",
        "15e12",
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    # Llama 3 8B: 8,030,261,248 parameters (RMSNorm weights only; our LayerNorms add a bias per norm)
    assert out["params"] == 8_030_261_248 + 65 * 4096
    assert out["model"]["n_kv_head"] == 8 and out["model"]["head_dim"] == 128


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            [
                "--n-layer",
                "2",
                "--d-model",
                "64",
                "--n-head",
                "8",
                "--vocab-size",
                "100",
                "--seq-len",
                "16",
                "--n-kv-head",
                "3",
            ],
            "--n-head must be a multiple of --n-kv-head",
        ),
        (["--n-kv-head", "2"], "--n-kv-head needs a model shape"),
    ],
)
def test_plan_bad_grouped_query_flags(capsys, extra, message):
    from lightning_scaling.cli import main

    assert main(["plan", "--flops", "1e18", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def _one_line_error(main, capsys, argv):
    assert _exit_code(main, ["plan", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    return lines[0]


def test_budget_too_small_for_one_parameter_is_refused_not_answered(main, capsys):
    # issue 14: `plan --flops 10` answered 0.155 parameters
    line = _one_line_error(main, capsys, ["--flops", "10"])
    assert line.startswith("lightning-scaling plan: error: --flops 10:")
    assert "0.155 parameters" in line and "at least 1 parameter" in line and "378 FLOPs" in line
    assert _exit_code(main, ["plan", "--flops", "400"]) == 0  # one parameter and up: an answer
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--target-loss", "1e308"], "--target-loss"),  # issue 14: the message said "loss"
        (["--target-loss", "943"], "--target-loss"),
        (["--target-loss", "1.8172000000001"], "--target-loss"),  # so close to E that the run overflows
        (["--flops", "1e3", "--law", "hoffmann"], "--flops"),  # 13.6 parameters but 0.91 tokens per parameter
        (["--params", "1", "--law", "hoffmann"], "--params"),  # 0.52 tokens per parameter
        (["--tokens", "2"], "--tokens"),
        (["--params", "1", "--tokens", "1"], "--params 1 and --tokens 1"),
        (["--params", "1e9", "--tokens", "1"], "--params 1e+09 and --tokens 1"),
        (["--flops", "1e6", "--params", "1e9"], "--flops 1e+06 and --params 1e+09"),
        (["--flops", "1e6", "--tokens", "1e9"], "--flops 1e+06 and --tokens 1e+09"),
        (["--flops", "1e21", "--unique-tokens", "0.5"], "--unique-tokens"),
        (["--flops", "1e21", "--inference-tokens", "0.5"], "--inference-tokens"),
    ],
)
def test_every_error_names_the_flag_as_typed(main, capsys, argv, flag):
    line = _one_line_error(main, capsys, argv)
    assert line.startswith(f"lightning-scaling plan: error: {flag}"), line
    assert "inf" not in line.split() and "nan" not in line.lower().split()


def test_few_unique_tokens_warn_that_the_repetition_law_is_saturated(main, capsys):
    # issue 14: `--flops 1e21 --unique-tokens 1` recommended 2.4 parameters for 6.95e19 epochs without a word
    assert main(["plan", "--flops", "1e21", "--unique-tokens", "1", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    warned = captured.err.strip().splitlines()
    assert len(warned) == 1 and warned[0].startswith("lightning-scaling plan: warning: ")
    assert "6.95e+19 epochs" in warned[0] and "past 72 epochs" in warned[0] and "Muennighoff" in warned[0]
    assert result["warnings"] == [warned[0].removeprefix("lightning-scaling plan: warning: ")]
    assert_advice_is_trainable(result)
    # a few epochs: no word
    assert main(["plan", "--flops", "1e22", "--unique-tokens", "5e10"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv, part",
    [
        (["--flops", "1e25"], "3.12e+11 parameters, over 10x the largest fitted (16B)"),
        (["--flops", "1e14"], "under 1/10 of the smallest fitted (70M)"),
        (["--params", "7e9", "--tokens", "1e14"], "1e+14 tokens, over 10x the largest fitted (500B)"),
        (["--flops", "1e21", "--params", "1e12"], "the planned run: 1e+12 parameters"),
        (["--flops", "1e24", "--law", "muennighoff"], "up to 9B parameters and up to 900B tokens"),
    ],
)
def test_plans_outside_the_fitted_range_say_so(main, capsys, argv, part):
    assert main(["plan", *argv]) == 0
    captured = capsys.readouterr()
    assert part in captured.err and "extrapolations" in captured.err, captured.err
    assert captured.err.count("\n") == 1 and captured.out  # one warning line; the table still prints


def test_plans_inside_the_fitted_range_print_no_warning(main, capsys):
    for argv in (["--flops", "1e21"], ["--params", "7e9", "--tokens", "2e12"], ["--flops", "1e24"]):
        assert main(["plan", *argv]) == 0
        assert capsys.readouterr().err == "", argv


def test_old_law_name_epoch_still_works_with_a_warning(main, capsys, plan_json):
    out = plan_json("--flops", "1e21", "--law", "epoch")
    assert out["law"]["name"] == "besiroglu" and out["params"] == pytest.approx(
        BESIROGLU_2024.compute_optimal(1e21).params
    )
    assert out["warnings"] == [
        (
            "--law 'epoch' is deprecated and will be removed in a future release: the preset is "
            "now 'besiroglu' (Besiroglu et al. 2024); use --law 'besiroglu'"
        )
    ]
    with pytest.warns(FutureWarning, match="law 'epoch' is deprecated"):
        assert plan(flops=1e21, law="Epoch")["law"]["name"] == "besiroglu"
    assert plan_json("--flops", "1e21", "--law", "Besiroglu")["law"]["name"] == "besiroglu"


def test_plan_law_file_with_a_recorded_fitted_range_warns_beyond_it(main, capsys, tmp_path):
    path = tmp_path / "fitted.json"
    path.write_text(
        json.dumps(
            {
                **HOFFMANN_2022.to_dict(),
                "name": "mine",
                "fit": {"fitted_range": {"params": [1e6, 1e8], "tokens": [2e7, 2e9]}},
            }
        )
    )
    assert main(["plan", "--flops", "1e18", "--law-file", str(path)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["plan", "--flops", "1e23", "--law-file", str(path)]) == 0
    err = capsys.readouterr().err
    assert "over 10x the largest fitted (100M)" in err and "The law mine was fitted on 1M to 100M" in err


def _closed_pipe_run(argv, **kwargs):
    """Run the console script writing to a pipe whose reader is already gone, as `... | head -0` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [_console_script(), *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, **kwargs
        )
    finally:
        os.close(write_end)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, status",
    [
        (["plan", "--flops", "1e21"], 141),  # 128 + SIGPIPE, what the shell reports for `cat` in the same place
        (["plan", "--flops", "1e21", "--json"], 141),
        (["plan", "--help"], 0),  # argparse itself ignores a closed stdout while printing help
    ],
)
def test_closed_stdout_exits_quietly_without_broken_pipe_traceback(argv, status):
    # issue 15: `lightning-scaling fit --json | head -3` printed a BrokenPipeError traceback (plan did too)
    done = _closed_pipe_run(argv)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stderr == ""
    assert done.returncode == status


@pytest.mark.slow
def test_plan_answers_well_under_two_seconds():
    import time

    script = _console_script()
    subprocess.run([script, "plan", "--flops", "1e21"], capture_output=True, timeout=60)  # warm the file cache
    start = time.perf_counter()
    done = subprocess.run(
        [
            script,
            "plan",
            "--flops",
            "1e21",
            "--unique-tokens",
            "1e10",
            "--inference-tokens",
            "1e12",
            "--gpu",
            "h100",
            "--batch-size",
            "256",
            "--seq-len",
            "4096",
        ],
        capture_output=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and elapsed < 2.0, (elapsed, done.stderr)


# -------------------------------------------------------------------------------------------------- the flags, fuzzed


FLAG_VALUES = [
    "1e21",
    "7e9",
    "2e12",
    "2.5",
    "0",
    "-1",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "1e-320",
    "abc",
    "",
    "12",
    "768",
    "1024",
    "50257",
    str(10**30),
    str(10**400),
    "0.4",
    "1.5",
    "3",
]


PLAN_FLAGS = [
    "--flops",
    "--params",
    "--tokens",
    "--target-loss",
    "--n-layer",
    "--d-model",
    "--n-head",
    "--vocab-size",
    "--seq-len",
    "--d-ff",
    "--n-kv-head",
    "--head-dim",
    "--unique-tokens",
    "--inference-tokens",
    "--num-gpus",
    "--mfu",
    "--peak-flops",
    "--batch-size",
    "--law",
    "--law-file",
    "--gpu",
    "--dtype",
    "--flops-convention",
]


SWITCHES = ["--gated-mlp", "--untied-embeddings", "--non-embedding"]


# law files for --law-file, good and bad; they live as long as this module
_LAW_DIR = tempfile.TemporaryDirectory(prefix="law-files-")
LAW_FILES = {
    "good.json": json.dumps(HOFFMANN_2022.to_dict()).encode(),
    "fitted.json": json.dumps(
        {
            **BESIROGLU_2024.to_dict(),
            "name": "mine",
            "fit": {"fitted_range": {"params": [1e6, 1e8], "tokens": [1e7, 1e9]}},
        }
    ).encode(),
    "bad range.json": json.dumps({**BESIROGLU_2024.to_dict(), "fit": {"fitted_range": {"params": 3}}}).encode(),
    "empty.json": b"",
    "latin1.json": b'{"E": 1.7, "name": "caf\xe9"}',
    "not json.json": b"{E: 1.7",
    "array.json": b"[1.69, 406.4]",
    "missing.json": b'{"E": 1.7, "A": 400}',
    "nan.json": b'{"E": NaN, "A": 400, "B": 400, "alpha": 0.3, "beta": 0.3}',
    "string.json": b'{"E": "1.7", "A": 400, "B": 400, "alpha": 0.3, "beta": 0.3}',
    "kaplan.json": json.dumps(KaplanLaw().to_dict()).encode(),
}
for _name, _content in LAW_FILES.items():
    (Path(_LAW_DIR.name) / _name).write_bytes(_content)
LAW_FILE_VALUES = [str(Path(_LAW_DIR.name) / name) for name in LAW_FILES] + ["/nonexistent/law.json", _LAW_DIR.name]
CHOICE_VALUES = {
    "--law": ["hoffmann", "besiroglu", "epoch", "muennighoff", "bogus"],
    "--gpu": ["h100", "a100", "toaster"],
    "--law-file": LAW_FILE_VALUES,
    "--dtype": ["bf16", "fp8", "fp64"],
    "--flops-convention": ["chinchilla", "palm", "nope"],
}


@st.composite
def plan_argv(draw):
    argv = ["plan"]
    for flag in draw(st.lists(st.sampled_from(PLAN_FLAGS), min_size=0, max_size=5, unique=True)):
        pool = CHOICE_VALUES.get(flag, FLAG_VALUES)
        argv += [f"{flag}={draw(st.sampled_from(pool))}"]
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
    if draw(st.booleans()):
        argv.append("--json")
    return argv


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(argv=plan_argv())
# int flags take any Python int: beyond 1e308 `float * int` raises OverflowError (a traceback, not exit 2)
@example(argv=["plan", "--flops=1e20", "--seq-len=16", f"--batch-size={10**400}"])
@example(argv=["plan", "--flops=1e20", "--gpu=h100", f"--num-gpus={10**400}"])
def test_plan_cli_rejects_with_one_line_naming_a_flag_or_prints_finite_results(argv, capsys):
    rc, out, err = run_cli_without_traceback(argv, capsys, argv)
    if rc == 0:
        assert err.strip() == "" or "Warning" not in err, err
        if "--json" in argv:
            result = json_without_nan(out)
            assert_finite({k: v for k, v in result.items() if k != "law"})
        else:
            assert "nan" not in out.lower().split(), out
        return
    assert_clean_rejection(rc, out, err, argv)
    assert re.search(r"--[a-z]", err), f"{argv}: the message names no flag: {err!r}"


BAD_FLAG_VALUES = ["nan", "inf", "-inf", "-1", "0", "abc", "", "1e400", "0.5", "-0", str(10**400), "1e308", "10"]


@pytest.mark.parametrize("flag", PLAN_FLAGS)
def test_each_plan_flag_with_a_bad_value_exits_2_naming_that_flag(flag, capsys):
    # one flag wrong at a time, beside a valid budget: the one line must name the flag as typed
    for value in BAD_FLAG_VALUES + CHOICE_VALUES.get(flag, []):
        base = ["--gpu", "h100"] if flag in ("--num-gpus", "--mfu", "--dtype") else []
        argv = ["plan", "--flops", "1e21", *base, f"{flag}={value}"]
        rc, out, err = run_cli_without_traceback(argv, capsys, argv)
        if rc == 0:  # a value that is fine after all (0.5 for --mfu, a good law file): a finite answer
            assert "nan" not in out.lower().split() and "inf" not in out.lower().split(), (argv, out)
            continue
        assert_clean_rejection(rc, out, err, argv)
        assert flag in err, (argv, err)


def test_each_plan_flag_is_fuzzed():
    from lightning_scaling.cli import build_parser

    parser = build_parser()
    plan_parser = parser._subparsers._group_actions[0].choices["plan"]
    flags = {opt for action in plan_parser._actions for opt in action.option_strings if opt.startswith("--")}
    assert flags - {"--help", "--json"} == set(PLAN_FLAGS) | set(SWITCHES)
