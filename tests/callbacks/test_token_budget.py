"""TokenBudget: tokens and parameters counted right (padding marked in labels too, the supervised tokens beside
them), the projection to the end of the run (exact when epochs end mid-accumulation), the warnings, and its
constructor arguments."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from gpt import GPTLightningModule
from helpers import (
    FUZZ,
    TINY,
    assert_every_constructor_argument_listed,
    assert_rejected_by_name,
    assert_rejected_by_name_or_stored_finite,
    quick_trainer,
    sft_collate,
    sft_rows,
    target_tokens,
    weird_numbers,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import DataRepetition, ScalingMonitor, TokenBudget
from lightning_scaling.callbacks._common import RULE_ALL, RULE_LABELS
from lightning_scaling.flops.counter import count_parameters


def _fit(callback, loader, module=None, steps=4, **kwargs):
    trainer = quick_trainer(None, [callback], steps=steps, **kwargs)
    trainer.fit(module or GPTLightningModule(TINY), loader)
    return trainer


def _data(n=32, seq=17):
    torch.manual_seed(0)
    return torch.randint(0, 256, (n, seq))


class _DictModule(GPTLightningModule):
    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def test_tensor_batch_tokens_and_params():
    budget = TokenBudget()
    trainer = _fit(budget, DataLoader(_data(), batch_size=4), steps=3)
    assert budget.tokens == 3 * 4 * 17
    assert budget.params == count_parameters(trainer.lightning_module)
    m = trainer.callback_metrics
    assert float(m["scaling/tokens"]) == budget.tokens
    assert float(m["scaling/tokens_per_param"]) == pytest.approx(budget.tokens / budget.params, rel=1e-5)


def test_tuple_and_dict_batches_and_attention_mask():
    data = _data(16)
    mask = torch.ones_like(data)
    mask[:, 12:] = 0  # 12 real tokens of 17 per row
    as_tuple = DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
    as_dict = DataLoader([{"input_ids": r} for r in data], batch_size=4)
    masked = DataLoader([{"input_ids": r, "attention_mask": m} for r, m in zip(data, mask, strict=True)], batch_size=4)
    counts = []
    for loader in (as_tuple, as_dict, masked):
        budget = TokenBudget()
        _fit(budget, loader, _DictModule(TINY), steps=2)
        counts.append(budget.tokens)
    assert counts == [2 * 4 * 17, 2 * 4 * 17, 2 * 4 * 12]


def test_masked_counts_are_read_back_once_per_optimizer_step(monkeypatch):
    # With an attention_mask, counting a micro-batch means summing a device tensor; reading each sum back would
    # make the host wait for the device on every micro-batch. The counts stay on the device until the step's
    # reduction, which reads them back in one go.
    import inspect

    from lightning_scaling.callbacks import _common, _ledger
    from lightning_scaling.callbacks.data_repetition import DataRepetition

    data = _data(32)
    mask = torch.ones_like(data)
    mask[:, 10:] = 0
    loader = DataLoader([{"input_ids": r, "attention_mask": m} for r, m in zip(data, mask, strict=True)], batch_size=2)
    reads: list[str] = []
    for name in ("item", "tolist", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = inspect.currentframe().f_back
            if caller.f_code.co_filename in (_common.__file__, _ledger.__file__):
                reads.append(f"{caller.f_code.co_name}:{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    budget, repetition = TokenBudget(), DataRepetition()
    trainer = quick_trainer(None, [budget, repetition], steps=3, accumulate_grad_batches=4)
    trainer.fit(_DictModule(TINY), loader)
    monkeypatch.undo()
    assert budget.tokens == repetition.tokens == 3 * 4 * 2 * 10
    assert reads.count("_read_back:tolist") == 3  # one per optimizer step, shared by both callbacks
    assert reads.count("count_tokens:item") <= 1  # TokenBudget's one look at a sample before training, not 24
    assert set(reads) <= {"_read_back:tolist", "count_tokens:item"}


def test_tokens_fn_and_accumulation():
    budget = TokenBudget(tokens_fn=lambda b: b[:, 1:].numel())
    _fit(budget, DataLoader(_data(), batch_size=2), steps=3, accumulate_grad_batches=2)
    assert budget.optimizer_steps == 3
    assert budget.tokens == 3 * 2 * 2 * 16


def test_non_embedding_params():
    budget = TokenBudget(non_embedding=True)
    trainer = _fit(budget, DataLoader(_data(), batch_size=4), steps=1)
    assert budget.params == count_parameters(trainer.lightning_module, non_embedding=True)
    assert budget.params < count_parameters(trainer.lightning_module)


def test_projection_and_undertrained_warning_fires_once_mid_run():
    budget = TokenBudget(projection_warmup_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(budget, DataLoader(_data(64), batch_size=4), steps=8)
    undertrained = [w for w in caught if "under the ~20x rule" in str(w.message)]
    assert len(undertrained) == 1
    assert "compute-optimal run is a" in str(undertrained[0].message)
    # 8 steps x 4 x 17 tokens: the projection equals the final count.
    assert budget.projected_tokens == pytest.approx(8 * 4 * 17)
    assert float(trainer.callback_metrics["scaling/projected_tokens_per_param"]) == pytest.approx(
        8 * 4 * 17 / budget.params, rel=1e-5
    )
    assert budget.compute_overhead > 1.0
    assert "undertrained" in budget.warned


def test_overtrained_is_reported_as_information(monkeypatch):
    import lightning_scaling.callbacks._common as common

    infos = []
    monkeypatch.setattr(common, "rank_zero_info", infos.append)
    # Pretend the model is tiny: 10 parameters against 544 tokens = 54 tokens per parameter.
    budget = TokenBudget(params=10, overtrained_factor=2.0, projection_warmup_steps=1, inference_tokens=1e4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(budget, DataLoader(_data(64), batch_size=4), steps=8)
    assert not [w for w in caught if "under the ~20x rule" in str(w.message)]
    assert "overtrained" in budget.warned
    overtrained = [m for m in infos if "tokens per parameter, over" in m]
    assert len(overtrained) == 1 and "inference-aware optimum" in overtrained[0]


def test_state_dict_round_trip_keeps_warnings_once():
    budget = TokenBudget(projection_warmup_steps=1)
    _fit(budget, DataLoader(_data(), batch_size=4), steps=2)
    restored = TokenBudget()
    restored.load_state_dict(budget.state_dict())
    assert restored.tokens == budget.tokens and restored.optimizer_steps == 2
    assert restored.warned == budget.warned


class FloatModule(L.LightningModule):
    """Trains on float features: batches with no token ids to count."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_uncountable_batch_warns_once_and_training_continues():
    budget = TokenBudget()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(budget, DataLoader(torch.randn(16, 4), batch_size=4), FloatModule(), steps=3)
    assert trainer.global_step == 3
    assert len([w for w in caught if "cannot count the tokens" in str(w.message)]) == 1


# ------------------------------------------------------------------------------------------------ messages
def _undertrained(callback):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(callback, DataLoader(_data(64), batch_size=4), steps=3)
    return [w for w in caught if "under the ~20x rule" in str(w.message)]


def test_warning_is_a_scaling_warning_that_points_at_no_file_of_ours():
    from lightning_scaling import ScalingWarning

    (warning,) = _undertrained(TokenBudget(projection_warmup_steps=1))
    assert warning.category is ScalingWarning and issubclass(ScalingWarning, UserWarning)
    assert warning.filename == "lightning_scaling" and warning.lineno == 0
    shown = warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
    assert ".py" not in shown and "callbacks" not in shown
    assert shown.startswith("lightning_scaling:0: ") and "TokenBudget: this run is projected" in shown
    # users silence all of ours with one filter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=ScalingWarning)
        _fit(TokenBudget(projection_warmup_steps=1), DataLoader(_data(64), batch_size=4), steps=3)
    assert not [w for w in caught if issubclass(w.category, ScalingWarning)]


def test_messages_name_the_class_the_user_configured():
    from lightning_scaling.callbacks import ScalingMonitor

    monitor = ScalingMonitor(
        flops=False, noise_scale=False, repetition=False, tokens={"projection_warmup_steps": 1}, report=False
    )
    (warning,) = _undertrained(monitor)
    assert str(warning.message).startswith("ScalingMonitor (tokens): this run is projected to end at")
    budget = monitor.tokens
    assert budget.configured_as == "ScalingMonitor"
    assert budget.option_hint("tokens_fn") == "ScalingMonitor(tokens_fn=...)"  # a monitor argument of its own
    assert budget.option_hint("non_embedding", "True") == 'ScalingMonitor(tokens={"non_embedding": True})'
    assert TokenBudget().option_hint("tokens_fn") == "TokenBudget(tokens_fn=...)"
    with pytest.raises(ValueError, match="configured_as"):
        budget.configured_as = "not a class name"


def test_uncountable_batch_through_the_monitor_names_the_monitor_argument():
    from lightning_scaling.callbacks import ScalingMonitor

    monitor = ScalingMonitor(flops=False, noise_scale=False, repetition=False, report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(monitor, DataLoader(torch.randn(16, 4), batch_size=4), FloatModule(), steps=2)
    (message,) = [str(w.message) for w in caught if "cannot count the tokens" in str(w.message)]
    assert message.startswith("ScalingMonitor (tokens): ") and "pass ScalingMonitor(tokens_fn=...)" in message
    assert "TokenBudget" not in message


def test_wall_clock_line_never_says_zero_minutes(monkeypatch):
    import lightning_scaling.callbacks._common as common

    infos = []
    monkeypatch.setattr(common, "rank_zero_info", infos.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(TokenBudget(projection_warmup_steps=2), DataLoader(_data(64), batch_size=4), steps=4)
    (line,) = [m for m in infos if "to go for the remaining" in m]
    assert "0.0 min" not in line and ("s to go" in line or "under 1 s" in line)


# ------------------------------------------------------------------- padding marked in labels, the rule in the report


class SFTModule(GPTLightningModule):
    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, 256), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def test_sft_run_counts_training_and_supervised_tokens_and_names_the_rule(tmp_path, monkeypatch):
    from lightning_scaling.callbacks import token_budget

    said: list[str] = []
    monkeypatch.setattr(token_budget, "rank_zero_info", said.append)
    rows = sft_rows(32)
    loader = DataLoader(rows, batch_size=4, collate_fn=sft_collate, shuffle=False)
    budget = TokenBudget()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quick_trainer(tmp_path, [budget], steps=8, log_every_n_steps=1)
        trainer.fit(SFTModule(TINY), loader)
    assert budget.tokens == sum(len(r["input_ids"]) for r in rows)  # not the padded 8 x 4 x longest
    assert budget.supervised_tokens == sum(int((r["labels"] != -100).sum()) for r in rows)
    assert budget.summary()["token_rule"] == RULE_LABELS
    assert float(trainer.callback_metrics["scaling/supervised_tokens"]) == budget.supervised_tokens
    preflight = next(m for m in said if "pre-flight" in m)
    assert f"tokens counted as: {RULE_LABELS}" in preflight


def test_monitor_report_names_the_rule(tmp_path):
    data = torch.randint(0, 256, (32, 17), generator=torch.Generator().manual_seed(0))
    monitor = ScalingMonitor(noise_scale=False, repetition=False, flops=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quick_trainer(tmp_path, [monitor], steps=2).fit(GPTLightningModule(TINY), DataLoader(data, batch_size=4))
    assert monitor.report["tokens"]["token_rule"] == RULE_ALL


def test_token_projection_is_exact_when_epochs_end_mid_accumulation(tmp_path):
    # 11 micro-batches per epoch, accumulation 4: each epoch is 3 optimizer steps, the last over 3 micro-batches.
    # A projection at "tokens per step x steps left" overstates the run; counting micro-batches is exact.
    data = torch.randint(0, 256, (44, 17), generator=torch.Generator().manual_seed(0))
    budget = TokenBudget(tokens_fn=target_tokens, projection_warmup_steps=2)
    repetition = DataRepetition(tokens_fn=target_tokens)
    trainer = quick_trainer(tmp_path, [budget, repetition], steps=-1, max_epochs=4, accumulate_grad_batches=4)
    projections = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if budget.projected_tokens is not None:
                projections.append(budget.projected_tokens)

    trainer.callbacks.append(Watch())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(GPTLightningModule(TINY), DataLoader(data, batch_size=4))
    actual = 4 * 44 * 16
    assert budget.tokens == actual and trainer.global_step == 4 * 3
    assert projections and all(p == pytest.approx(actual) for p in projections), projections
    assert repetition.projected_tokens == pytest.approx(actual)


# ---------------------------------------------------------------------------------------------- constructor arguments


NAN, INF = math.nan, math.inf


BAD_ARGUMENTS = {  # every constructor argument, with values that must be refused with a ValueError naming it
    "tokens_fn": [3, "input_ids"],
    "non_embedding": ["no", 1, None],
    # a law that is not one would only fail at the first projection and switch TokenBudget off
    "law": ["no-such-law", "hoffman", 3, object()],
    "tokens_per_param": [0, -20, NAN, INF, "20", True],
    "overhead_threshold": [-0.1, NAN, INF, "0.1", True],
    "overtrained_factor": [0, NAN, INF, "5", True],
    "inference_tokens": [0, -1, NAN, INF, "1e12", True],
    "params": [0, -1, 1.5, "1e6", True],
    "projection_warmup_steps": [0, -1, 2.5, "10", True],
}


@pytest.mark.parametrize(
    "argument, value", [(arg, value) for arg, values in BAD_ARGUMENTS.items() for value in values], ids=repr
)
def test_bad_argument_is_a_value_error_naming_it(argument, value):
    assert_rejected_by_name(TokenBudget, argument, value)


def test_every_constructor_argument_is_listed():
    assert_every_constructor_argument_listed(TokenBudget, BAD_ARGUMENTS)


@FUZZ
@given(
    argument=st.sampled_from(
        [
            "tokens_per_param",
            "overhead_threshold",
            "overtrained_factor",
            "inference_tokens",
            "params",
            "projection_warmup_steps",
            "tokens_fn",
        ]
    ),
    value=weird_numbers,
)
def test_weird_numbers_are_rejected_by_name_or_stored_finite(argument, value):
    assert_rejected_by_name_or_stored_finite(TokenBudget, argument, value)


def test_token_budget_takes_a_preset_name():
    from lightning_scaling.laws.definitions import HOFFMANN_2022

    assert TokenBudget(law="hoffmann").law is HOFFMANN_2022
