"""The noise scale from the normalization layers' per-example gradients (Gray et al. 2024): the probe against
torch.func's per-example gradients for every kind of norm layer it recognises, the estimate against the truth on
a model whose only parameters are a norm's weights, and what it says when it cannot measure."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from helpers import quick_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_scaling.callbacks._norm_layers import NormLayerProbe
from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale

H = 12


def _per_example_reference(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, prefix: str
) -> tuple[float, float]:
    """(Σ_i |g_i|², |Σ_i g_i|²) over the parameters named ``prefix...``, with torch.func in float64, where g_i is
    example i's piece of the gradient of the mean over the batch of per-example mean squared errors."""
    model = model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p: dict, xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xi[None],))
        return (out - ti[None]).square().mean() / x.shape[0]

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x.double(), target.double())
    per = torch.cat([g.reshape(x.shape[0], -1) for n, g in sorted(grads.items()) if n.startswith(prefix)], dim=1)
    return float(per.square().sum()), float(per.sum(0).square().sum())


def _norm_kinds() -> list[tuple[str, Any]]:
    kinds: list[tuple[str, Any]] = [
        ("nn.LayerNorm", lambda: torch.nn.LayerNorm(H)),
        ("nn.LayerNorm without bias", lambda: torch.nn.LayerNorm(H, bias=False)),
        ("nn.RMSNorm", lambda: torch.nn.RMSNorm(H)),
        ("nn.RMSNorm eps", lambda: torch.nn.RMSNorm(H, eps=1e-3)),
    ]
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        kinds.append(("transformers LlamaRMSNorm", lambda: LlamaRMSNorm(H, eps=1e-6)))
    except ImportError:  # pragma: no cover - transformers is in the test extra
        pass
    try:
        from litgpt.model import RMSNorm as LitRMSNorm

        kinds.append(("litgpt RMSNorm", lambda: LitRMSNorm(H)))
    except ImportError:  # pragma: no cover
        pass
    from lightning_scaling.kernels import FusedLayerNorm, FusedRMSNorm

    kinds += [("FusedLayerNorm", lambda: FusedLayerNorm(H)), ("FusedRMSNorm", lambda: FusedRMSNorm(H))]
    kinds.append(("any y = w * f(x) named RMSNorm", lambda: MaxScaledRMSNorm()))
    return kinds


@pytest.mark.parametrize("name,make", _norm_kinds(), ids=[k[0] for k in _norm_kinds()])
def test_probe_matches_per_example_gradients_of_every_norm_kind(name: str, make: Any) -> None:
    torch.manual_seed(0)
    norm = make()
    with torch.no_grad():  # weights and biases away from their init, so that every term matters
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = torch.nn.Sequential(torch.nn.Linear(H, H), norm, torch.nn.Linear(H, 3))
    x = torch.randn(5, 7, H)
    target = torch.randn(5, 7, 3)
    probe = NormLayerProbe()
    assert probe.find(model) == f"1 x {type(norm).__name__}"
    probe.attach()
    probe.start(5, check=True)
    loss = (model(x) - target).square().mean(dim=(1, 2)).mean()
    loss.backward()
    example_sq, batch_sq, examples = probe.collect()
    assert examples == 5 and float(probe.take_mismatched()) == 0  # Σ_i g_i reproduces autograd's .grad
    probe.detach()
    reference = model
    if type(norm).__name__.startswith("Fused"):  # torch.func cannot see through the Triton op: same weights in torch's
        twin = torch.nn.LayerNorm(H) if "Layer" in type(norm).__name__ else torch.nn.RMSNorm(H)
        twin.load_state_dict(norm.state_dict())
        reference = torch.nn.Sequential(model[0], twin, model[2])
    want = _per_example_reference(reference, x, target, prefix="1.")
    assert float(example_sq) == pytest.approx(want[0], rel=1e-4)
    assert float(batch_sq) == pytest.approx(want[1], rel=1e-4)


def test_weight_coordinates_too_small_to_divide_by_are_left_out_of_both_sums_and_the_check() -> None:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(H)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(H))
        norm.bias.add_(0.3 * torch.randn(H))
        norm.weight[0] = 0.0  # y - b = 0 there: that coordinate's x̂ cannot be read back from the output
    model = torch.nn.Sequential(torch.nn.Linear(H, H), norm, torch.nn.Linear(H, 3))
    x, target = torch.randn(5, 7, H), torch.randn(5, 7, 3)
    probe = NormLayerProbe()
    probe.find(model)
    probe.attach()
    probe.start(5, check=True)
    (model(x) - target).square().mean(dim=(1, 2)).mean().backward()
    example_sq, batch_sq, _ = probe.collect()
    assert float(probe.take_mismatched()) == 0  # the check compares the coordinates measured
    model = model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p: dict, xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(model, p, (xi[None],)) - ti[None]).square().mean() / 5

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x.double(), target.double())
    per = torch.cat([grads["1.weight"][:, 1:], grads["1.bias"]], dim=1)  # all but weight[0]
    assert float(example_sq) == pytest.approx(float(per.square().sum()), rel=1e-4)
    assert float(batch_sq) == pytest.approx(float(per.sum(0).square().sum()), rel=1e-4)
    assert float(grads["1.weight"][:, 0].square().sum()) > 1e-6  # what was left out is not nothing


# ---------------------------------------------------------------------------------------------------------------
# the closed-form problem: the only parameters are a LayerNorm's weight and bias; lr = 0, so the truth is fixed
class NormOnly(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.norm = torch.nn.LayerNorm(H)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.5 * torch.randn(H))
            self.norm.bias.copy_(0.5 * torch.randn(H))
        self.register_buffer("readout", torch.randn(H))

    def loss_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = (self.norm(x) @ self.readout).mean(-1)  # [batch]: one number per sequence
        return 0.5 * (pred - y).square()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_of(x, y).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _population(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, H, generator=g) * (1 + torch.rand(n, 6, 1, generator=g))
    y = torch.randn(n, generator=g) + x[..., 0].mean(-1)
    return x, y


def _train(
    module: L.LightningModule,
    callback: L.Callback,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    steps: int,
    root: Any = None,
    **trainer_options: Any,
) -> L.Trainer:
    """Fit ``module`` on (x, y) for ``steps`` optimizer steps with ``callback``, Lightning's warnings silenced."""
    trainer = quick_trainer(root, [callback], steps, **trainer_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=batch_size))
    return trainer


def _true_b_simple(module: NormOnly) -> float:
    """tr(Σ)/|G|² from every sample's own gradient over a large population (float64, torch.func)."""
    x, y = _population(20_000, seed=99)
    params = {n: p.detach().double() for n, p in module.named_parameters()}
    buffers = {n: b.double() for n, b in module.named_buffers()}

    def model_loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.layer_norm(xi, (H,), p["norm.weight"], p["norm.bias"])
        return 0.5 * ((out @ buffers["readout"]).mean(-1) - yi).square()

    grads = torch.func.vmap(torch.func.grad(model_loss), in_dims=(None, 0, 0))(params, x.double(), y.double())
    per = torch.cat([grads[n].reshape(len(x), -1) for n in sorted(grads)], dim=1)
    mean = per.mean(0)
    trace_cov = float((per - mean).square().sum(1).mean()) * len(x) / (len(x) - 1)
    return trace_cov / float(mean.square().sum())


def test_norm_only_model_estimate_is_on_the_truth_without_accumulation() -> None:
    steps, batch = 300, 16
    module = NormOnly()
    truth = _true_b_simple(module)
    x, y = _population(steps * batch, seed=0)
    cb = GradientNoiseScale(ema_decay=0.99, warmup_steps=10**9, norm_layers_every_n_steps=1)
    trainer = _train(module, cb, x, y, batch_size=batch, steps=steps)
    assert cb.mode == "norm layers" and cb.norm_layers_found == "1 x LayerNorm"
    est = cb.estimate()
    assert est.measurements == steps
    assert 0 < est.stderr < 0.25 * truth, (est, truth)
    assert abs(est.b_simple - truth) < 4 * est.stderr, (est, truth)
    assert cb.norm_estimator.b_simple == pytest.approx(est.b_simple)
    assert float(trainer.callback_metrics["scaling/gns"]) == pytest.approx(est.b_simple, rel=1e-6)
    assert cb.summary()["status"].startswith("measured")


def test_norm_only_model_with_accumulation_reports_both_and_they_agree() -> None:
    steps, micro = 150, 8
    module = NormOnly()
    truth = _true_b_simple(module)
    x, y = _population(steps * 2 * micro, seed=3)
    cb = GradientNoiseScale(ema_decay=0.98, warmup_steps=10**9, norm_layers_every_n_steps=1)
    trainer = _train(module, cb, x, y, batch_size=micro, steps=steps, accumulate_grad_batches=2)
    assert cb.mode == "hooks"  # the whole model's estimate is the main one; the norm layers' is beside it
    whole, norm = cb.estimate(), cb.norm_estimator.estimate()
    assert norm.measurements == steps
    for est in (whole, norm):  # here the norm layers ARE the whole model: both must find the truth
        assert abs(est.b_simple - truth) < 4 * est.stderr, (est, truth)
    assert float(trainer.callback_metrics["scaling/gns_norm_layers"]) == pytest.approx(norm.b_simple, rel=1e-6)
    summary = cb.summary()  # the factor to pass as norm_layers_scale: the whole model's over the norm layers'
    assert summary["whole_over_norm_layers"] == pytest.approx(whole.b_simple / norm.b_simple, rel=1e-12)


def _norm_only_fit(scale: float, monkeypatch: Any) -> tuple[GradientNoiseScale, list[str]]:
    from lightning_scaling.callbacks import _common

    said: list[str] = []
    monkeypatch.setattr(_common, "rank_zero_info", said.append)
    x, y = _population(40 * 8, seed=4)
    cb = GradientNoiseScale(warmup_steps=10**9, norm_layers_every_n_steps=1, norm_layers_scale=scale)
    _train(NormOnly(), cb, x, y, batch_size=8, steps=40)
    return cb, said


def test_norm_layers_scale_multiplies_the_estimate_where_the_norm_layers_are_the_only_source(monkeypatch: Any) -> None:
    plain, said_plain = _norm_only_fit(1.0, monkeypatch)
    scaled, said_scaled = _norm_only_fit(2.5, monkeypatch)
    assert plain.mode == scaled.mode == "norm layers"
    # same data, same model: the norm layers' own figure is the same, the estimate is 2.5x it
    assert scaled.norm_estimator.b_simple == pytest.approx(plain.norm_estimator.b_simple, rel=1e-9)
    assert scaled.estimate().b_simple == pytest.approx(2.5 * plain.estimate().b_simple, rel=1e-9)
    assert plain.estimate().b_simple == pytest.approx(plain.norm_estimator.b_simple, rel=1e-9)
    assert scaled.summary()["norm_layers_scale"] == 2.5
    assert math.isnan(plain.summary()["whole_over_norm_layers"])  # one source: no factor to report
    # without a factor the run is told once that the figure reads about half; with one, nothing more is said
    assert sum("about half the whole model's" in m for m in said_plain) == 1
    assert not any("about half" in m for m in said_scaled)


# ---------------------------------------------------------------------------------------------------------------
# what it says when it cannot measure
class OffsetRMSNorm(torch.nn.Module):
    """Named like an RMSNorm, shaped like one, but its output is x̂ ⊙ (1 + w), as Gemma's is, not x̂ ⊙ w: the
    per-example formula does not hold for it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((H,), 0.5))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)


class MaxScaledRMSNorm(torch.nn.Module):
    """Named like an RMSNorm but scales by the max instead of the RMS: y = w ⊙ f(x) all the same, so the
    per-example weight gradients Σ_t dy ⊙ y / w are exact for it too."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(H))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / (x.abs().amax(-1, keepdim=True) + self.eps)


class Wrapped(L.LightningModule):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.head = torch.nn.Linear(H, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.head(self.inner(x)).mean((1, 2)) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _fit(module: L.LightningModule, monkeypatch: Any, steps: int = 6) -> tuple[GradientNoiseScale, list[str]]:
    from lightning_scaling.callbacks import _common

    said: list[str] = []
    monkeypatch.setattr(_common, "rank_zero_info", said.append)
    x, y = _population(steps * 4, seed=5)
    cb = GradientNoiseScale(warmup_steps=10**9)
    _train(module, cb, x, y, batch_size=4, steps=steps)
    return cb, said


def test_a_norm_layer_whose_formula_misses_autograd_switches_the_estimate_off_once(monkeypatch: Any) -> None:
    cb, said = _fit(Wrapped(OffsetRMSNorm()), monkeypatch)
    assert cb.mode == "off" and cb.norm_estimator.count == 0 and cb.estimator.count == 0
    off = [m for m in said if "did not reproduce" in m]
    assert len(off) == 1 and "1 of 1 normalization layers" in off[0]
    assert "did not reproduce" in cb.summary()["status"]


def test_a_model_without_norm_layers_says_so_once(monkeypatch: Any) -> None:
    cb, said = _fit(Wrapped(torch.nn.Linear(H, H)), monkeypatch)
    assert cb.mode == "off"
    assert sum("no normalization layers" in m for m in said) == 1
    assert "accumulate_grad_batches" in cb.summary()["status"]


def test_norm_layers_false_keeps_the_old_behaviour(monkeypatch: Any) -> None:
    from lightning_scaling.callbacks import _common

    monkeypatch.setattr(_common, "rank_zero_info", lambda m: None)
    cb = GradientNoiseScale(norm_layers=False)
    x, y = _population(16, seed=5)
    _train(NormOnly(), cb, x, y, batch_size=4, steps=4)
    assert cb.mode == "off" and cb.norm_estimator.count == 0
    with pytest.raises(ValueError, match="norm_layers"):
        GradientNoiseScale(norm_layers="yes")  # type: ignore[arg-type]


def test_norm_estimate_survives_a_checkpoint(tmp_path: Any) -> None:
    a = GradientNoiseScale(warmup_steps=10**9, norm_layers_every_n_steps=1)
    x, y = _population(40, seed=7)
    _train(NormOnly(), a, x, y, batch_size=4, steps=5, root=tmp_path, enable_checkpointing=True)
    b = GradientNoiseScale()
    b.load_state_dict(a.state_dict())
    assert b.norm_estimator.state_dict() == a.norm_estimator.state_dict() and b.norm_estimator.count == 5
    assert math.isfinite(b.norm_estimator.grad_sq)


def test_norm_layers_are_measured_on_every_nth_step_only(monkeypatch: Any) -> None:
    from lightning_scaling.callbacks import _common

    monkeypatch.setattr(_common, "rank_zero_info", lambda m: None)
    cb = GradientNoiseScale(warmup_steps=10**9, norm_layers_every_n_steps=3)
    x, y = _population(40, seed=5)
    _train(NormOnly(), cb, x, y, batch_size=4, steps=10)
    assert cb.norm_estimator.count == 4  # steps 0, 3, 6, 9
    with pytest.raises(ValueError, match="norm_layers_every_n_steps"):
        GradientNoiseScale(norm_layers_every_n_steps=0)
