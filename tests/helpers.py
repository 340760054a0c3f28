"""What several test files share (fixtures live in conftest.py files): a tiny GPT, its batches, a quiet CPU
Trainer and the closed-form linear regression on which the gradient noise scale is known exactly; a catcher for
our warnings; the bad-input fuzzing (values, the check that a call answers or rejects by name); the command-line
runner; and isoFLOP ladders under a known scaling law."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from gpt import GPTConfig
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from lightning_scaling.laws import fitting as F
from lightning_scaling.laws.definitions import ChinchillaLaw

TINY = GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64)
SEQ = TINY.seq_len + 1  # a batch row is seq_len inputs plus the next-byte target


def target_tokens(batch: torch.Tensor) -> int:
    """Training tokens of a [B, seq_len + 1] batch: the seq_len predicted bytes of each row."""
    return batch[:, 1:].numel()


def token_rows(n: int = 64, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``seq`` random byte ids, the same for every call with the same seed."""
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def quick_trainer(tmp_path, callbacks, steps: int = 4, **kwargs) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar, summary or validation unless asked for, rooted at
    ``tmp_path`` (None: Lightning's default, the working directory)."""
    opts = dict(
        max_steps=steps,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    opts.update(kwargs)
    return L.Trainer(callbacks=callbacks, **opts)


def hf_padded_batches(n: int = 16) -> list[dict[str, torch.Tensor]]:
    """``n`` right-padded batches of 4 (attention mask, labels -100 at the padding), lengths cycling 12-24."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(1, 128, (4, (12, 16, 20, 24)[i % 4]), generator=g)
        mask = torch.ones_like(ids)
        mask[1:, ids.shape[1] // 2 :] = 0
        out.append(
            {"input_ids": ids * mask, "attention_mask": mask, "labels": (ids * mask).masked_fill(mask == 0, -100)}
        )
    return out


class HFLlamaModule(L.LightningModule):
    """A Hugging Face LlamaForCausalLM from a tiny config (random init, nothing downloaded)."""

    def __init__(self) -> None:
        import transformers

        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=128,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        )

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the closed-form problem of McCandlish et al. 2018, App. A: x ~ N(0, I_d), y = xᵀw* + σε, loss ½(xᵀw − y)², with
# w = w* + δ; lr = 0 freezes w, so B_simple stays d + 1 + dσ²/|δ|²
REGRESSION_DIM = 16
TRUE_B_SIMPLE = REGRESSION_DIM + 1 + REGRESSION_DIM * 1.0**2 / 1.0**2  # σ = 1, |δ| = 1: 33 samples


class ClosedFormRegression(L.LightningModule):
    """½(xᵀw − y)² started at w = w* + e₀; ``scheduler`` builds an LR scheduler for the SGD optimizer (per step)."""

    def __init__(self, lr: float = 0.0, scheduler: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(REGRESSION_DIM, 1, bias=False)
        w_star = torch.linspace(-1, 1, REGRESSION_DIM)
        delta = torch.zeros(REGRESSION_DIM)
        delta[0] = 1.0
        with torch.no_grad():
            self.lin.weight.copy_((w_star + delta)[None])
        self.register_buffer("w_star", w_star)
        self.lr = lr
        self.scheduler = scheduler

    def loss_of(self, batch: Any) -> torch.Tensor:
        """The micro-batch's mean loss (in fp32, also under a 16-bit autocast)."""
        x, eps = batch
        return 0.5 * (self.lin(x).squeeze(-1).float() - (x @ self.w_star + eps)).pow(2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_of(batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


def regression_data(rows: int, micro: int, seed: int = 0, sigma: float = 1.0) -> DataLoader:
    """``rows`` samples of the regression in micro-batches of ``micro`` (in order, the last partial one dropped)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, REGRESSION_DIM, generator=gen)
    eps = sigma * torch.randn(rows, generator=gen)
    return DataLoader(TensorDataset(x, eps), batch_size=micro, shuffle=False, drop_last=True)


# ----------------------------------------------------------------------------------------------- our warnings, caught

OURS = re.compile(r"^(FlopCounter|TokenBudget|GradientNoiseScale|DataRepetition|ScalingMonitor)( \([a-z_]+\))?: ")


class Captured:
    """Our warnings (``warnings.warn`` via rank_zero_warn) and info lines (rank_zero_info logging)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.infos: list[str] = []

    @property
    def all(self) -> list[str]:
        return self.warnings + self.infos

    def matching(self, pattern: str) -> list[str]:
        return [m for m in self.all if re.search(pattern, m)]

    def check(self, allow_internal: bool = False) -> None:
        """No internal error, and no message of ours twice (at most one warning per kind)."""
        internal = [m for m in self.all if "switched off after an error" in m]
        assert allow_internal or not internal, f"our bookkeeping raised: {internal}"
        dupes = {m for m in self.all if self.all.count(m) > 1}
        assert not dupes, f"repeated: {dupes}"


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.INFO)
        self.sink = sink
        self.seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) in self.seen:  # the same record reaching us through a parent logger too
            return
        self.seen.add(id(record))
        message = record.getMessage()
        if OURS.match(message):
            self.sink.append(message)


@contextlib.contextmanager
def captured(allow_internal: bool = False):
    """Collects our warnings and info lines inside the block; on leaving it, ``Captured.check`` runs."""
    cap = Captured()
    handler = _ListHandler(cap.infos)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            yield cap
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    cap.warnings = [str(w.message) for w in records if OURS.match(str(w.message))]
    cap.check(allow_internal)


def assert_no_nan_metrics(trainer: L.Trainer) -> None:
    """No ``scaling/*`` metric the Trainer holds is NaN."""
    for name, value in trainer.callback_metrics.items():
        if name.startswith("scaling/"):
            assert not math.isnan(float(value)), f"{name} is NaN"


# -------------------------------------------------------------------------------------------------- bad input, fuzzed

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAN, INF = float("nan"), float("inf")

# any value a user might pass where a positive number is expected
weird_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-300, max_value=1e300),
    st.integers(min_value=-(10**6), max_value=10**400),
    st.sampled_from([0, -1, 0.0, -0.0, NAN, INF, -INF, 1e308, 5e-324, True, False, None, "1e9", "abc", "", [], [1.0]]),
)
# ... and anything at all: wrong types too
any_value = st.one_of(
    weird_numbers,
    st.text(max_size=4),
    st.sampled_from(
        [
            {},
            {"E": 1.0},
            (),
            (1.0, 2.0),
            b"1",
            np.float32(3.0),
            np.int64(7),
            np.bool_(True),
            np.array([1.0, -1.0]),
            np.array(2.5),
            object(),
            float,
            "nan",
            "inf",
            " 12 ",
        ]
    ),
)


def all_numbers(value, path="result"):
    """Yield (path, float) for every number in a result (dataclasses, dicts, sequences, numpy arrays)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from all_numbers(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from all_numbers(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from all_numbers(v, f"{path}[{i}]")
    elif isinstance(value, np.ndarray):
        for i, v in enumerate(np.asarray(value, dtype=float).ravel()):
            yield f"{path}[{i}]", float(v)
    elif isinstance(value, (bool, str)) or value is None:
        return
    elif isinstance(value, (int, float, np.integer, np.floating)):
        yield path, float(value)


def assert_no_nan(value):
    """No number anywhere in ``value`` is NaN."""
    for path, number in all_numbers(value):
        assert not math.isnan(number), f"{path} is NaN"


def assert_finite(value):
    """Every number anywhere in ``value`` is finite."""
    for path, number in all_numbers(value):
        assert math.isfinite(number), f"{path} is {number}"


def answer_or_value_error(fn, *names):
    """Run ``fn()``: a result, or None after a ValueError whose message names one of ``names``.

    Any other exception (OverflowError, ZeroDivisionError, numpy's FloatingPointError, ...) fails the test, and so
    does a RuntimeWarning from numpy (overflow, invalid value) escaping to the user.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            return fn()
        except ValueError as err:
            message = str(err)
            assert any(name in message for name in names), f"ValueError does not name any of {names}: {message!r}"
            return None


def assert_rejected_by_name(cls: type, argument: str, value: object) -> None:
    """``cls(argument=value)`` raises a ValueError naming ``argument`` (or, for a dict of options, one of its keys)."""
    with pytest.raises(ValueError) as err:
        cls(**{argument: value})
    names = {argument, *(k for k in (value if isinstance(value, dict) else {}))}
    assert any(name in str(err.value) for name in names), str(err.value)


def assert_every_constructor_argument_listed(cls: type, listed: dict) -> None:
    """``listed`` (argument -> bad values) names every argument of ``cls.__init__``, and no other."""
    import inspect

    params = {p for p in inspect.signature(cls.__init__).parameters if p != "self"}
    assert params == set(listed), f"{cls.__name__}: untested {params - set(listed)}, stale {set(listed) - params}"


def assert_rejected_by_name_or_stored_finite(cls: type, argument: str, value: object) -> None:
    """``cls(argument=value)`` raises a ValueError naming ``argument``, or stores no NaN or inf in a number."""
    try:
        callback = cls(**{argument: value})
    except ValueError as err:
        assert argument in str(err), f"{cls.__name__}({argument}={value!r}): {err}"
        return
    stored = {k: v for k, v in vars(callback).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, number in stored.items():
        if key in ("batch_size", "batch_tokens", "last_loss"):  # documented NaN placeholders before the first step
            continue
        assert math.isfinite(number), f"{cls.__name__}({argument}={value!r}) stored {key}={number}"


# --------------------------------------------------------------------------------------------------- the command line


def run_cli(argv, capsys):
    """``main(argv)`` in-process: (exit status, stdout, stderr); argparse's SystemExit counts as its status."""
    from lightning_scaling.cli import main

    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_cli_without_traceback(argv, capsys, label):
    """``run_cli`` with RuntimeWarnings as errors; any exception (a traceback reaching the user) fails the test,
    with ``label`` (the input) in its message."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            return run_cli(argv, capsys)
        except Exception as error:
            raise AssertionError(f"{label}: {type(error).__name__}: {error}") from error


def assert_clean_rejection(rc, out, err, argv):
    """Exit status 2 and one line on stderr, no traceback or warning, and nothing else."""
    assert rc == 2, f"{argv}: exit {rc}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{argv}: stderr is not one line:\n{err}"
    assert "Traceback" not in err and "Warning" not in err
    assert "error" in lines[0]


def json_without_nan(text):
    """``json.loads(text)``, failing on NaN or Infinity anywhere in it."""

    def refuse(name):
        raise AssertionError(f"JSON holds {name}")

    return json.loads(text, parse_constant=refuse)


def assert_advice_is_trainable(result):
    """Every optimum the plan offers is at least one parameter trained on at least one token per parameter."""
    from lightning_scaling.planner import MIN_PARAMS, MIN_TOKENS_PER_PARAM

    advice = [result["compute_optimum"], result["same_loss_optimum"]]
    if result["mode"] in ("flops", "params", "tokens", "target_loss"):
        advice.append(result)  # the law chose the run itself
    if result["data"]:
        advice.append(result["data"]["optimum"])
    if result["inference"]:
        advice.append(result["inference"]["optimum"])
    for run in filter(None, advice):
        assert run["params"] >= MIN_PARAMS and run["tokens"] >= MIN_TOKENS_PER_PARAM * run["params"], run


# ---------------------------------------------------------------------------------- isoFLOP ladders under a known law

# the law the fitting tests generate their runs from, and a small grid of approach-3 starts around the paper's
TRUE_LAW = ChinchillaLaw(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)
SMALL_GRID = F.approach3_grid()[::9]


def ladder(law, noise: float = 0.0, seed: int = 0, budgets=(1e17, 1e18, 1e19, 1e20), sizes: int = 8):
    """isoFLOP ladder: at each budget, model sizes spread ±1 decade around the optimum; D = C/(6N)."""
    rng = np.random.default_rng(seed)
    n, d = [], []
    for c in budgets:
        n_mid = math.sqrt(c / 6 / 20)
        for k in np.geomspace(n_mid / 8, n_mid * 8, sizes):
            n.append(k)
            d.append(c / (6 * k))
    n, d = np.array(n), np.array(d)
    loss = np.asarray(law.loss(n, d)) * np.exp(noise * rng.standard_normal(n.size))
    return n, d, loss


def isoflop_ladder(budgets=(1e17, 1e18, 1e19, 1e20), sizes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) of an isoFLOP ladder: at each budget, sizes spread ±1 decade around √(C/120); D = C/(6N)."""
    n, d = [], []
    for c in budgets:
        mid = math.sqrt(c / 120)
        for size in np.geomspace(mid / 8, mid * 8, sizes):
            n.append(size)
            d.append(c / (6 * size))
    return np.array(n), np.array(d)


def grid_ladder(sizes=(1e7, 3e7, 1e8, 3e8), tokens=(1e9, 3e9, 1e10, 3e10)) -> tuple[np.ndarray, np.ndarray]:
    """Every model size trained for every token count (a curve per size), so that sizes and tokens vary alone."""
    n, d = np.meshgrid(sizes, tokens, indexing="ij")
    return n.ravel(), d.ravel()


def sft_rows(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """litgpt-style supervised fine-tuning samples: a prompt (labels -100) then a response, unpadded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, response = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g))
        ids = torch.randint(1, 256, (prompt + response,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def sft_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pads input_ids with 0 and labels with -100 to the longest row, with no attention mask (as litgpt does)."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n] = r["input_ids"], r["labels"]
    return {"input_ids": ids, "labels": labels}
