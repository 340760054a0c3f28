"""FlopCounter: measured FLOPs of real training steps, cached by shape (a few shapes of pad-to-longest batches
measured, the rest predicted within 1%), right under accumulation, variable sequence length, activation
checkpointing, torch.compile, skipped batches and flex attention; failures of the counting pass and models that
cannot run under it; its constructor arguments."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from gpt import GPTConfig, GPTLightningModule
from helpers import (
    FUZZ,
    TINY,
    assert_every_constructor_argument_listed,
    assert_no_nan_metrics,
    assert_rejected_by_name,
    assert_rejected_by_name_or_stored_finite,
    captured,
    quick_trainer,
    target_tokens,
    token_rows,
    weird_numbers,
)
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import FlopCounter, ScalingMonitor
from lightning_scaling.flops.counter import measure_training_flops
from lightning_scaling.flops.formulas import transformer_flops


def _loader(batch_size=4, seq_len=16, n=64):
    torch.manual_seed(0)
    data = torch.randint(0, 256, (n, seq_len + 1))
    return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True)


def _fit(callback, loader=None, module=None, **kwargs):
    module = module or GPTLightningModule(TINY)
    trainer = quick_trainer(None, [callback], **kwargs)
    trainer.fit(module, loader or _loader())
    return trainer


def test_counts_once_per_shape_and_sums_over_steps():
    # A step counts what the counter measures of it (the counter against Chinchilla's Appendix F:
    # tests/flops/test_counter.py), and the analytic count is Appendix F's for every sequence.
    counter = FlopCounter()
    _fit(counter, steps=5)
    assert counter.measured_shapes == 1
    assert counter.optimizer_steps == 5
    assert counter.total_flops == 5 * counter.last_step_flops > 0
    module, batch = GPTLightningModule(TINY), next(iter(_loader()))  # FLOPs do not depend on the weights
    assert counter.last_step_flops == measure_training_flops(lambda: module._loss(batch).backward()).total
    per_sequence = transformer_flops(
        TINY.n_layer, TINY.d_model, TINY.n_head, TINY.seq_len, TINY.vocab_size, d_ff=TINY.d_ff, gated_mlp=True
    ).total
    assert counter.total_analytic_flops == 5 * 4 * per_sequence


def test_accumulation_equals_one_big_batch():
    small = FlopCounter()
    _fit(small, _loader(batch_size=4), steps=3, accumulate_grad_batches=2)
    big = FlopCounter()
    _fit(big, _loader(batch_size=8), steps=3)
    assert small.optimizer_steps == big.optimizer_steps == 3
    assert small.total_flops == big.total_flops


class _VariableLength(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.randint(0, 256, (9 if i < 8 else 17,))


def test_variable_sequence_length_counts_each_shape():
    counter = FlopCounter()
    _fit(counter, DataLoader(_VariableLength(), batch_size=4), steps=4)
    assert counter.measured_shapes == 2
    short, long = sorted(f for f, _ in counter._shapes.exact.values())
    assert counter.total_flops == 2 * short + 2 * long
    assert long > 1.9 * short  # about twice the tokens


def test_mfu_against_peak_override_and_logged_metrics():
    counter = FlopCounter(peak_flops=1e12)
    trainer = _fit(counter, steps=3)
    m = trainer.callback_metrics
    assert float(m["scaling/flops"]) == pytest.approx(counter.total_flops, rel=1e-6)
    assert float(m["scaling/mfu"]) == pytest.approx(float(m["scaling/flops_per_sec"]) / 1e12, rel=1e-5)
    assert 0 < float(m["scaling/mfu"]) < 1


def test_unknown_device_logs_no_mfu():
    counter = FlopCounter()
    trainer = _fit(counter, steps=2)
    assert "scaling/mfu" not in trainer.callback_metrics
    assert "scaling/flops_per_sec" in trainer.callback_metrics


class _Checkpointed(GPTLightningModule):
    def forward(self, idx):
        model = self.model
        x = model.tok(idx) + model.pos(torch.arange(idx.shape[1]))
        for block in model.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return model.head(model.ln_f(x))


def test_activation_checkpointing_model_vs_hardware_flops():
    plain = FlopCounter()
    _fit(plain, steps=1)
    ckpt = FlopCounter()
    trainer = _fit(ckpt, module=_Checkpointed(TINY), steps=1)
    assert ckpt.total_flops == pytest.approx(plain.total_flops, rel=1e-6)
    assert ckpt.total_hardware_flops > 1.1 * ckpt.total_flops
    assert "scaling/hardware_flops" in trainer.callback_metrics


class _Compiled(GPTLightningModule):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = torch.compile(self.model, backend="eager")


def test_torch_compiled_module_is_counted():
    plain = FlopCounter()
    _fit(plain, steps=1)
    compiled = FlopCounter()
    _fit(compiled, module=_Compiled(TINY), steps=1)
    assert compiled.total_flops == plain.total_flops > 0


def test_a_formula_that_fails_voids_the_measurement_never_the_step():
    """The counter runs inside the real step: an error in counting must not reach the user's code."""
    from lightning_scaling.flops.counter import register_flop_formula

    lib = torch.library.Library("lstest_fail", "DEF")
    lib.define("double(Tensor x) -> Tensor")
    lib.impl("double", lambda x: x * 2, "CompositeExplicitAutograd")
    register_flop_formula("lstest_fail::double", lambda *a, **k: 1 // 0)

    class Doubling(GPTLightningModule):
        def forward(self, idx):
            return torch.ops.lstest_fail.double(super().forward(idx))

    counter = FlopCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(counter, module=Doubling(TINY), steps=4)
    assert len([w for w in caught if "FLOP counter failed" in str(w.message)]) == 1
    assert trainer.global_step == 4
    assert counter.total_flops == 0
    assert counter.total_analytic_flops > 0  # the shape is known: the analytic count goes on
    assert "scaling/flops" not in trainer.callback_metrics


def test_measure_false_logs_the_analytic_count_only():
    counter = FlopCounter(measure=False)
    trainer = _fit(counter, steps=2)
    assert counter.measured_shapes == 0 and counter.total_flops == 0
    assert "scaling/flops_analytic" in trainer.callback_metrics


def test_measured_step_trains_exactly_as_without_the_counter():
    """Counting happens inside the real step, which is not run twice: training matches a run without it."""

    def run(callbacks):
        L.seed_everything(1, verbose=False)
        module = GPTLightningModule(GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64, dropout=0.0))
        trainer = quick_trainer(None, callbacks, steps=3, accumulate_grad_batches=2)
        trainer.fit(module, _loader())
        return [p.detach().clone() for p in module.parameters()]

    with_counter = run([FlopCounter()])
    without = run([])
    for a, b in zip(with_counter, without, strict=True):
        torch.testing.assert_close(a, b)


def test_state_dict_round_trip_and_convention_check():
    counter = FlopCounter()
    _fit(counter, steps=2)
    restored = FlopCounter()
    restored.load_state_dict(counter.state_dict())
    assert restored.total_flops == counter.total_flops
    assert restored.optimizer_steps == 2
    other = FlopCounter(causal_attention="full")
    with pytest.warns(UserWarning, match="mixes both conventions"):
        other.load_state_dict(counter.state_dict())


def test_full_convention_counts_more_attention():
    half = FlopCounter()
    _fit(half, steps=1)
    full = FlopCounter(causal_attention="full")
    _fit(full, steps=1)
    b, s, h, d = 4, 16, 2, 16
    assert full.total_flops - half.total_flops == 3 * (4 * b * h * s * s * d) // 2


def test_batch_layouts_are_counted():
    """Tensor, tuple and dict batches all reach the counting pass."""

    class DictModule(GPTLightningModule):
        def training_step(self, batch, batch_idx):
            ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
            logits = self(ids[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    data = torch.randint(0, 256, (16, 17))
    as_dict = DataLoader([{"input_ids": row} for row in data], batch_size=4)
    as_tuple = DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
    totals = []
    for loader in (as_dict, as_tuple):
        counter = FlopCounter()
        _fit(counter, loader, DictModule(TINY), steps=2)
        totals.append(counter.total_flops)
    plain = FlopCounter()
    _fit(plain, DataLoader(data, batch_size=4), steps=2)
    assert totals[0] == totals[1] == plain.total_flops > 0


def test_warns_once_when_measured_and_analytic_disagree():
    """A model shape that claims 8 layers for a 1-layer module: the sign of FLOPs nothing counted."""
    shape = {"n_layer": 8, "d_model": 32, "n_head": 2, "vocab_size": 256, "seq_len": 16, "d_ff": 64, "gated_mlp": True}
    counter = FlopCounter(model_shape=shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(counter, steps=3)
    assert len([w for w in caught if "analytic count" in str(w.message)]) == 1


def test_no_mismatch_warning_for_the_example_shape():
    counter = FlopCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(counter, steps=2)
    assert not [w for w in caught if "analytic count" in str(w.message)]


def test_shapes_beyond_the_limit_are_estimated_from_the_measured_shape():
    counter = FlopCounter(max_measured_shapes=1)
    _fit(counter, DataLoader(_VariableLength(), batch_size=4), steps=4)
    assert counter.measured_shapes == 1
    (short,) = [f for f, _ in counter._shapes.exact.values()]
    estimate = (counter.total_flops - 2 * short) / 2  # two steps of each length
    module = GPTLightningModule(TINY)
    long = measure_training_flops(lambda: module.training_step(torch.randint(0, 256, (4, 17)), 0).backward()).total
    per_token = short * (4 * 17) / (4 * 9)
    # the measured shape's split into attention (quadratic in s) and the rest beats scaling it per token; it is
    # not exact here (this model sees s - 1 positions of an s-long row, a per-sample term one shape cannot show)
    assert per_token < estimate < long


# ---------------------------- skipped batches, flex attention, pad-to-longest batches, models that refuse the counter


def _rows(n=32, seq=17, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _quiet_fit(trainer, module, loader, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, **kwargs)


class SkipsFromHook(GPTLightningModule):
    """on_train_batch_start returning -1 makes Lightning skip the rest of the epoch after our hook ran."""

    modes_seen: ClassVar[list[int]] = []  # dispatch modes active in each training_step, over all instances

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 2 else None

    def training_step(self, batch, batch_idx):
        self.modes_seen.append(len(_get_current_dispatch_mode_stack()))
        return super().training_step(batch, batch_idx)


def test_a_batch_skipped_by_on_train_batch_start_leaves_no_counter_open(tmp_path):
    batches = [_rows(4, 9), _rows(4, 13), _rows(4, 17), _rows(4, 11)]  # a new shape every batch
    module = SkipsFromHook(TINY)
    counter = FlopCounter()
    _quiet_fit(quick_trainer(tmp_path, [counter], steps=-1, max_epochs=2), module, DataLoader(batches, batch_size=None))
    assert _get_current_dispatch_mode_stack() == []  # nothing outlives the fit
    assert max(module.modes_seen) <= 1  # never two counters stacked
    assert counter.optimizer_steps == 4  # batches 0 and 1 of each epoch


def test_flex_attention_called_directly_is_counted_not_broken(tmp_path):
    flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no flex attention")

    class FlexGPT(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb, self.qkv, self.out = (
                torch.nn.Embedding(256, 32),
                torch.nn.Linear(32, 96),
                torch.nn.Linear(32, 256),
            )

        def training_step(self, batch, batch_idx):
            x = self.emb(batch[:, :-1])
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
            # flex attention has no CPU backward in torch 2.13: its inputs are detached here, the rest trains
            y = flex.flex_attention(q.detach(), k.detach(), v.detach()).transpose(1, 2).reshape(x.shape)
            logits = self.out(y)
            return F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    counter = FlopCounter()
    trainer = quick_trainer(tmp_path, [counter], steps=2)
    _quiet_fit(trainer, FlexGPT(), DataLoader(_rows(), batch_size=4))
    assert trainer.global_step == 2 and counter.total_flops > 0


class PaddedLM(GPTLightningModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch["input_ids"], batch_idx)


def _pad_to_longest(rows):
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def test_pad_to_longest_measures_a_few_shapes_and_predicts_the_rest_within_1_percent(tmp_path):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 33, (160,), generator=g)
    rows = [torch.randint(0, 256, (int(n),), generator=g) for n in lengths]
    loader = DataLoader(rows, batch_size=4, collate_fn=_pad_to_longest)
    cfg = GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=32, d_ff=64)
    shapes = {tuple(b["input_ids"].shape) for b in loader}
    assert len(shapes) >= 15  # the run really sees many shapes

    counter = FlopCounter()
    L.seed_everything(0, verbose=False)
    quick_trainer(tmp_path, [counter], steps=40).fit(PaddedLM(cfg), loader)
    # the reference: every step's batch counted on its own (FLOPs do not depend on the weights)
    reference_model = PaddedLM(cfg)
    every = sum(
        measure_training_flops(lambda b=b: reference_model.training_step(b, 0).backward()).total
        for b in list(loader)[:40]
    )
    # the first shape's attention split gives a formula, the second fails it (this model sees s - 1 positions
    # of an s-long batch: a per-sample term in F(b, s)), so the two shapes fit the token terms, a third fails
    # them and a fourth checks the formula with the per-sample term
    assert counter.measured_shapes == 4
    assert counter.total_flops == pytest.approx(every, rel=0.01)


class NoDispatchGPT(GPTLightningModule):
    """A model that refuses to run under any TorchDispatchMode (as some custom kernels do)."""

    def training_step(self, batch, batch_idx):
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        if _get_current_dispatch_mode_stack():
            raise RuntimeError("custom kernel cannot run under a dispatch mode")
        return super().training_step(batch, batch_idx)


def test_model_that_cannot_run_under_the_counter_trains_with_measure_false(tmp_path):
    # FLOPs are counted inside the real step, so a model that refuses any dispatch mode opts out of measuring
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0}, flops={"measure": False})
    with captured():
        trainer = quick_trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=2)
        trainer.fit(NoDispatchGPT(TINY), DataLoader(token_rows(32), batch_size=2))
    assert trainer.global_step == 4
    assert monitor.flops.total_flops == 0
    assert "scaling/flops" not in trainer.callback_metrics
    # the analytic count goes on (the shape is known from module.config)
    assert monitor.flops.total_analytic_flops > 0 and "scaling/flops_analytic" in trainer.callback_metrics
    assert monitor.tokens.tokens == 4 * 2 * 2 * 16
    assert monitor.noise_scale.estimator.count == 4
    assert_no_nan_metrics(trainer)


# ---------------------------------------------------------------------------------------------- constructor arguments


NAN, INF = math.nan, math.inf


BAD_ARGUMENTS = {  # every constructor argument, with values that must be refused with a ValueError naming it
    "peak_flops": [0, -1.0, NAN, INF, "1e12", True],
    "causal_attention": ["quarter", 1, None],
    "model_shape": [{"n_layer": 2}, 3],
    "analytic_tolerance": [0, -0.1, NAN, INF, "0.1", True],
    "window": [0, -1, 1.5, "20", True],
    "max_measured_shapes": [0, -2, 2.5, "8", True],
    "measure": ["no", 1, None],
}


@pytest.mark.parametrize(
    "argument, value", [(arg, value) for arg, values in BAD_ARGUMENTS.items() for value in values], ids=repr
)
def test_bad_argument_is_a_value_error_naming_it(argument, value):
    assert_rejected_by_name(FlopCounter, argument, value)


def test_every_constructor_argument_is_listed():
    assert_every_constructor_argument_listed(FlopCounter, BAD_ARGUMENTS)


@FUZZ
@given(
    argument=st.sampled_from(["peak_flops", "causal_attention", "analytic_tolerance", "window", "max_measured_shapes"]),
    value=weird_numbers,
)
@example(argument="peak_flops", value=10**400)  # float(10**400): OverflowError in positive_float
@example(argument="window", value=2**63)  # deque(maxlen=2**63): OverflowError
def test_weird_numbers_are_rejected_by_name_or_stored_finite(argument, value):
    assert_rejected_by_name_or_stored_finite(FlopCounter, argument, value)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_layer": -1, "d_model": 32, "n_head": 2, "vocab_size": 256, "seq_len": 16},
        {"n_layer": 1, "d_model": 0, "n_head": 2, "vocab_size": 256, "seq_len": 16},
        {"n_layer": 1, "d_model": 33, "n_head": 2, "vocab_size": 256, "seq_len": 16},  # not divisible by n_head
        {"n_layer": 1, "d_model": 32, "n_head": 2, "vocab_size": 256, "seq_len": -16},
    ],
)
def test_flop_counter_rejects_an_impossible_model_shape_at_construction(bad):
    # Accepted now, it would only fail inside the run (transformer_flops raises in _add_analytic) and switch the
    # whole FlopCounter off mid-training with an "internal error" warning.
    with pytest.raises(ValueError, match=r"model_shape|n_layer|d_model|seq_len|n_head"):
        FlopCounter(model_shape=bad)
