"""Per-example gradient norms of a model's normalization layers, from tensors the backward pass already has.

Gray et al. 2024 ("Normalization layer per-example gradients are sufficient to predict gradient noise scale in
transformers", arXiv 2411.00999) show that the noise scale of the LayerNorm/RMSNorm parameters alone tracks the
whole model's. Their per-example gradients are cheap: for a norm layer y = x̂ ⊙ w (+ b) over the last dimension,
example i's weight gradient is Σ_t dy[i, t] ⊙ x̂[i, t] and its bias gradient Σ_t dy[i, t], summed over that
example's rows t. An example is a batch of one, so the per-example norms and the micro-batch's own gradient of
the same parameters give the noise scale two batch sizes (1 and b) without an extra pass (docs/math.md §5.5).

How: a forward hook on each norm layer keeps a reference to its input (which autograd keeps for the layer's
backward anyway) and puts a hook on its output; when the output's gradient dy arrives, the hook recomputes x̂ with
one fused normalization, forms the per-example gradients ([examples, width]), adds their squared norms and their
sum over examples to two accumulators on the device, and lets go of the input. No [batch, tokens, width] tensor is
kept beyond the hook. Layers found (by type, not by name): ``nn.LayerNorm`` and ``nn.RMSNorm`` over the last
dimension, this project's ``FusedLayerNorm``/``FusedRMSNorm``, and RMSNorm modules of other libraries (Hugging Face,
litgpt) that hold one weight vector and an epsilon. Every layer's formula is checked once against autograd: on the
first measured micro-batch whose ``.grad`` is its own, the sum of the per-example weight gradients must equal the
weight's ``.grad``; a mismatch switches the estimate off (the caller reads the count with its step record: no host
read of its own).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

# A weight-gradient check passes when the per-example sum reproduces .grad to this relative error (fp32 maths;
# half-precision models cast x̂ to 16 bits before the weight multiplies it).
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 2e-2


def _layer_kind(module: torch.nn.Module) -> str | None:
    """'layer' (LayerNorm), 'rms' (RMSNorm) or None, for a norm layer over the last dimension with a weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or not weight.requires_grad:
        return None
    if isinstance(module, torch.nn.LayerNorm):
        return "layer" if len(module.normalized_shape) == 1 else None
    if isinstance(module, torch.nn.RMSNorm):
        return "rms" if len(module.normalized_shape) == 1 else None
    # our fused norms: a model holding one has imported their module already (no Triton import here)
    fused = sys.modules.get("lightning_scaling.kernels.modules")
    if fused is not None and isinstance(module, fused.FusedLayerNorm):
        return "layer"
    if fused is not None and isinstance(module, fused.FusedRMSNorm):
        return "rms"
    # Other libraries' RMSNorm (Hugging Face's LlamaRMSNorm & co., litgpt's RMSNorm): one weight vector, an epsilon,
    # no children; their formula is then checked against autograd on the first step.
    own = dict(module.named_parameters(recurse=False))
    if (type(module).__name__.endswith("RMSNorm") and set(own) == {"weight"}
            and isinstance(_declared_epsilon(module), float) and not any(True for _ in module.children())):
        return "rms"
    return None


def _declared_epsilon(module: torch.nn.Module) -> Any:
    """The module's epsilon attribute (Hugging Face's ``variance_epsilon``, else ``eps``), None when it has none."""
    eps = getattr(module, "variance_epsilon", None)
    return getattr(module, "eps", None) if eps is None else eps


def _epsilon(module: torch.nn.Module, x: torch.Tensor) -> float:
    eps = _declared_epsilon(module)
    return float(eps) if eps is not None else float(torch.finfo(x.dtype).eps)  # nn.RMSNorm's eps=None


class NormLayerProbe:
    """Finds a model's norm layers and measures per-example squared gradient norms of their parameters.

    Life cycle: :meth:`find` (once) -> :meth:`attach` -> per micro-batch :meth:`start` ... backward ...
    :meth:`collect` -> :meth:`detach`. Values are device scalars (no host read): the caller puts them in its books.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[str, torch.nn.Module, str]] = []  # (qualified name, module, kind)
        self._handles: list[Any] = []
        self._active = False
        self._examples: int | None = None
        self._example_sq: torch.Tensor | None = None  # Σ over layers of |g_i|², per example i: [examples]
        self._batch: dict[int, list[torch.Tensor]] = {}  # per layer: Σ_i g_i of weight (and bias)
        self._checking = False
        self._mismatched: torch.Tensor | None = None  # layers whose Σ_i g_i missed .grad (device count)
        self.error: str | None = None  # why the last micro-batch could not be measured, in words

    # ------------------------------------------------------------------------------------------- set-up
    def find(self, model: torch.nn.Module) -> str:
        """Find the norm layers; returns a one-line description ('9 x LayerNorm', or '' when there are none)."""
        self.layers = [(name, m, kind) for name, m in model.named_modules() if (kind := _layer_kind(m)) is not None]
        counts = Counter(type(m).__name__ for _, m, _ in self.layers)
        return ", ".join(f"{n} x {cls}" for cls, n in counts.most_common())

    def attach(self) -> None:
        self.detach()
        for index, (_, module, kind) in enumerate(self.layers):
            self._handles.append(module.register_forward_hook(self._forward_hook(index, kind)))

    def detach(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(Exception):
                handle.remove()
        self._handles = []
        self._active = False

    # ------------------------------------------------------------------------------------ per micro-batch
    def start(self, examples: int, check: bool) -> None:
        """Measure the coming backward for a micro-batch of ``examples`` samples; ``check``: compare each layer's
        per-example sum with its ``.grad`` afterwards (only when ``.grad`` will hold this micro-batch alone)."""
        self._active, self._examples, self._checking = True, examples, check
        self._example_sq, self._batch, self.error = None, {}, None

    def collect(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """After the backward: (Σ_i |g_i|², |Σ_i g_i|², examples) over all norm parameters, as the gradients
        flowed (the caller undoes the loss scale and Lightning's 1/k); None when nothing was measured."""
        self._active = False
        if self.error is not None or self._example_sq is None or not self._batch or self._examples is None:
            return None
        if self._checking:
            self._check()
        batch_sq = torch.stack([torch.stack([v.square().sum() for v in parts]).sum()
                                for parts in self._batch.values()]).sum()
        example_sq = self._example_sq.sum()
        self._example_sq, self._batch = None, {}
        return example_sq, batch_sq, self._examples

    def take_mismatched(self) -> torch.Tensor | None:
        """Layers whose formula missed autograd in the last check (a device count), once."""
        mismatched, self._mismatched = self._mismatched, None
        return mismatched

    # -------------------------------------------------------------------------------------------- hooks
    def _forward_hook(self, index: int, kind: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._active or not args or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            if torch._C._current_graph_task_id() != -1:  # recomputed inside a backward (activation checkpointing)
                return
            x = args[0]
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != weight.shape[0]:
                return
            if x.shape[0] != self._examples:
                self.error = (f"a norm layer's input leads with {x.shape[0]} rows for a micro-batch of "
                              f"{self._examples} samples (not batch-first)")
                return
            output.register_hook(self._gradient_hook(index, module, kind, x))

        return hook

    def _gradient_hook(self, index: int, module: torch.nn.Module, kind: str, x: torch.Tensor) -> Any:
        def hook(dy: torch.Tensor) -> None:
            if not self._active:
                return
            try:
                self._measure(index, module, kind, x, dy)
            except Exception as err:  # noqa: BLE001 - never break the user's backward; the caller says why
                self.error = f"{type(err).__name__}: {err}"

        return hook

    def _measure(self, index: int, module: torch.nn.Module, kind: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        width = x.shape[-1]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.detach().to(dtype).reshape(x.shape[0], -1, width)
        eps = _epsilon(module, x)
        x_hat = F.layer_norm(xf, (width,), eps=eps) if kind == "layer" else F.rms_norm(xf, (width,), eps=eps)
        d = dy.detach().to(dtype).reshape(x.shape[0], -1, width)
        per_example = [(d * x_hat).sum(1)]  # [examples, width]: each example's weight gradient
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter) and bias.requires_grad:
            per_example.append(d.sum(1))
        sq = torch.stack([g.square().sum(-1) for g in per_example]).sum(0)
        self._example_sq = sq if self._example_sq is None else self._example_sq + sq
        sums = [g.sum(0) for g in per_example]
        previous = self._batch.get(index)  # a layer called twice in one forward: its gradient is the sum
        self._batch[index] = sums if previous is None else [a + b for a, b in zip(previous, sums)]

    def _check(self) -> None:
        """Count the layers whose Σ_i g_i(weight) is not their weight's .grad (device tensors, no host read)."""
        flags = []
        for index, parts in self._batch.items():
            weight = self.layers[index][1].weight
            grad = weight.grad if isinstance(weight, torch.Tensor) else None
            if grad is None:
                continue
            ours = parts[0]
            tol = CHECK_TOLERANCE.get(grad.dtype, HALF_TOLERANCE)
            error = (ours - grad.to(ours.dtype)).norm()
            flags.append((error > tol * grad.to(ours.dtype).norm() + 1e-30).to(torch.float32))
        if flags:
            self._mismatched = torch.stack(flags).sum()
        self._checking = False
