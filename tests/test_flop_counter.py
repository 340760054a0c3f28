"""FlopCounter: measured FLOPs of real training steps, cached by shape, right under accumulation, DDP,
variable sequence length, activation checkpointing, torch.compile, and failures of the counting pass."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from gpt import GPTConfig, GPTLightningModule, make_dataloaders
from torch.utils.data import DataLoader

from lightning_scaling.callbacks.flop_counter import FlopCounter
from lightning_scaling.flops.formulas import transformer_flops

TINY = GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64)


def _trainer(callbacks, steps=4, **kwargs):
    defaults = dict(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def _loader(batch_size=4, seq_len=16, n=64):
    torch.manual_seed(0)
    data = torch.randint(0, 256, (n, seq_len + 1))
    return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True)


def _fit(callback, loader=None, module=None, **kwargs):
    module = module or GPTLightningModule(TINY)
    trainer = _trainer([callback], **kwargs)
    trainer.fit(module, loader or _loader())
    return trainer


def test_example_gpt_measured_within_5_percent_of_appendix_f():
    cfg = GPTConfig()  # the example's default shape
    counter = FlopCounter()
    train, _ = make_dataloaders(cfg.seq_len, 4, max_bytes=100_000)
    _fit(counter, train, GPTLightningModule(cfg), steps=1)
    analytic = 4 * transformer_flops(
        cfg.n_layer, cfg.d_model, cfg.n_head, cfg.seq_len, cfg.vocab_size, d_ff=cfg.d_ff, gated_mlp=True
    ).total
    assert counter.total_flops == pytest.approx(analytic, rel=0.05)
    assert counter.total_analytic_flops == pytest.approx(analytic)


def test_counts_once_per_shape_and_sums_over_steps():
    counter = FlopCounter()
    _fit(counter, steps=5)
    assert counter.measured_shapes == 1
    assert counter.optimizer_steps == 5
    assert counter.total_flops == 5 * counter.last_step_flops > 0


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

    lib = torch.library.Library("lstest_fail", "DEF")  # noqa: TOR901
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
        trainer = _trainer(callbacks, steps=3, accumulate_grad_batches=2)
        trainer.fit(module, _loader())
        return [p.detach().clone() for p in module.parameters()]

    with_counter = run([FlopCounter()])
    without = run([])
    for a, b in zip(with_counter, without):
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


@pytest.mark.parametrize(
    "kwargs, match",
    [({"peak_flops": -1}, "peak_flops"), ({"causal_attention": "quarter"}, "causal_attention"),
     ({"model_shape": {"n_layer": 2}}, "model_shape"), ({"window": 0}, "window")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlopCounter(**kwargs)


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


def test_shapes_beyond_the_limit_are_estimated_per_token():
    counter = FlopCounter(max_measured_shapes=1)
    _fit(counter, DataLoader(_VariableLength(), batch_size=4), steps=4)
    assert counter.measured_shapes == 1
    (short,) = [f for f, _ in counter._shapes.exact.values()]
    long = int(short * (4 * 17) / (4 * 9))  # estimated from the measured shape, per token
    assert counter.total_flops == 2 * short + 2 * long


def test_hugging_face_llama_config_is_read_with_grouped_query_attention():
    from lightning_scaling.flops.model_shape import shape_from

    llama = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
             "vocab_size": 100, "max_position_embeddings": 16, "intermediate_size": 128, "hidden_act": "silu"}
    shape = shape_from(llama)
    assert (shape.n_layer, shape.d_model, shape.n_head, shape.n_kv_head, shape.d_ff) == (2, 64, 8, 2, 128)
    assert shape.gated_mlp
    expected = transformer_flops(2, 64, 8, 16, 100, d_ff=128, gated_mlp=True, n_kv_head=2).total
    assert shape.training_flops_per_sequence() == expected
    with pytest.raises(ValueError, match="n_kv_head"):
        shape_from({**llama, "num_key_value_heads": 3})
