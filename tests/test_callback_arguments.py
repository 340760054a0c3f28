"""Every public constructor argument of the callbacks: wrong types, out-of-range values, NaN and inf each get a
ValueError that names the argument. Plus the faults of issue 14 that live in the callbacks: float64 training,
and a token projection that is exact when epochs end mid-accumulation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from gpt import GPTConfig, GPTLightningModule
from helpers import quick_trainer, target_tokens
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import (
    DataRepetition,
    FlopCounter,
    GradientNoiseScale,
    ScalingMonitor,
    TokenBudget,
)

NAN, INF = math.nan, math.inf

BAD = {
    FlopCounter: {
        "peak_flops": [0, -1.0, NAN, INF, "1e12", True],
        "causal_attention": ["quarter", 1, None],
        "model_shape": [{"n_layer": 2}, 3],
        "analytic_tolerance": [0, -0.1, NAN, INF, "0.1", True],
        "window": [0, -1, 1.5, "20", True],
        "max_measured_shapes": [0, -2, 2.5, "8", True],
        "measure": ["no", 1, None],
    },
    TokenBudget: {
        "tokens_fn": [3, "input_ids"],
        "non_embedding": ["no", 1, None],
        "law": ["no-such-law", 3, object()],
        "tokens_per_param": [0, -20, NAN, INF, "20", True],
        "overhead_threshold": [-0.1, NAN, INF, "0.1", True],
        "overtrained_factor": [0, NAN, INF, "5", True],
        "inference_tokens": [0, -1, NAN, INF, "1e12", True],
        "params": [0, -1, 1.5, "1e6", True],
        "projection_warmup_steps": [0, -1, 2.5, "10", True],
    },
    GradientNoiseScale: {
        "ema_decay": [0, 1.0, 1.5, NAN, "0.99", True],
        "warmup_steps": [-1, 1.5, NAN, "100", True],
        "high_ratio": [1.0, 0.5, NAN, INF, "4", True],
        "low_ratio": [0, 1.0, NAN, "0.25", True],
        "hysteresis": [1.0, 0.5, NAN, INF, "1.5", True],
        "min_measurements": [0, -1, 1.5, "20", True],
        "tokens_fn": [3, "input_ids"],
        "norm_layers": [1, "yes", None],
        "norm_layers_every_n_steps": [0, -1, 1.5, "4", True],
    },
    DataRepetition: {
        "unique_tokens": [0, -1, NAN, INF, "1e9", True],
        "tokens_fn": [3, "input_ids"],
        "sketch": ["yes", 1, 0.5],
        "sketch_precision": [3, 19, 14.5, "14", True],
        "warn_epochs": [0, -4, NAN, INF, "4", True],
        "stop_epochs": [0, NAN, INF, "40", True],
        "law": [3, "muennighoff"],
        "params": [0, -1, NAN, INF, "1e6", True],
        "sketch_every_n_steps": [0, -1, 2.5, "5", True],
    },
    ScalingMonitor: {
        "tokens_fn": [3],
        "law": ["no-such-law", 3],
        "causal_attention": ["quarter"],
        "peak_flops": [-1, NAN],
        "unique_tokens": [0, INF],
        "inference_tokens": [-1],
        "flops": ["yes", 1, {"no_such_option": 1}],
        "tokens": ["yes", {"window": 3}],
        "noise_scale": ["yes", {"every_n_steps": 25}],
        "repetition": [0, {"sketch": "yes"}],
        "report": ["no", 1, None],
        "print_report": ["no", 1, None],
    },
}


@pytest.mark.parametrize(
    "cls, argument, value",
    [(cls, arg, value) for cls, args in BAD.items() for arg, values in args.items() for value in values],
    ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__,
)
def test_bad_argument_is_a_value_error_naming_it(cls, argument, value):
    with pytest.raises(ValueError) as err:
        cls(**{argument: value})
    names = {argument, *(k for k in (value if isinstance(value, dict) else {}))}
    assert any(name in str(err.value) for name in names), str(err.value)


def test_every_constructor_argument_is_covered():
    import inspect

    for cls, args in BAD.items():
        params = {p for p in inspect.signature(cls.__init__).parameters if p != "self"}
        assert params == set(args), f"{cls.__name__}: untested {params - set(args)}, stale {set(args) - params}"


def test_float64_training_measures_the_noise_scale(tmp_path):
    """precision="64-true": the gradient norms are taken in float64, not refused."""
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    data = torch.randint(0, 256, (32, 17), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quick_trainer(tmp_path, [monitor], steps=3, accumulate_grad_batches=2, precision="64-true")
        trainer.fit(GPTLightningModule(GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64)),
                    DataLoader(data, batch_size=4))
    assert monitor.noise_scale.enabled and monitor.noise_scale.estimator.count == 3
    assert not [w for w in caught if "switched off" in str(w.message)]
    assert monitor.flops.total_flops > 0


def test_token_projection_is_exact_when_epochs_end_mid_accumulation(tmp_path):
    # 11 micro-batches per epoch, accumulation 4: each epoch is 3 optimizer steps, the last over 3 micro-batches.
    # A projection at "tokens per step x steps left" overstates the run; counting micro-batches is exact.
    data = torch.randint(0, 256, (44, 17), generator=torch.Generator().manual_seed(0))
    budget = TokenBudget(tokens_fn=target_tokens, projection_warmup_steps=2)
    repetition = DataRepetition(tokens_fn=target_tokens)
    trainer = quick_trainer(tmp_path, [budget, repetition], steps=-1, max_epochs=4, accumulate_grad_batches=4)
    projections = []

    class Watch(ScalingMonitor.__mro__[1]):  # a plain Callback
        def on_train_batch_end(self, trainer, *args):
            if budget.projected_tokens is not None:
                projections.append(budget.projected_tokens)

    trainer.callbacks.append(Watch())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(GPTLightningModule(GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64)),
                    DataLoader(data, batch_size=4))
    actual = 4 * 44 * 16
    assert budget.tokens == actual and trainer.global_step == 4 * 3
    assert projections and all(p == pytest.approx(actual) for p in projections), projections
    assert repetition.projected_tokens == pytest.approx(actual)
