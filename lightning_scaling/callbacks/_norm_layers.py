"""Per-example gradient norms of a model's normalization layers, from tensors the backward pass already has.

Gray et al. 2024 ("Normalization layer per-example gradients are sufficient to predict gradient noise scale in
transformers", arXiv 2411.00999) show that the noise scale of the LayerNorm/RMSNorm parameters alone tracks the
whole model's. Their per-example gradients are cheap: for a norm layer y = x̂ ⊙ w (+ b) over the last dimension,
example i's weight gradient is Σ_t dy[i, t] ⊙ x̂[i, t] and its bias gradient Σ_t dy[i, t], summed over that
example's rows t. An example is a batch of one, so the per-example norms and the micro-batch's own gradient of
the same parameters give the noise scale two batch sizes (1 and b) without an extra pass (docs/math.md §5.5).

How: a forward hook on each norm layer puts a hook on its output y (which the next layer keeps for its own backward
in a transformer); when the output's gradient dy arrives, that hook sums dy ⊙ y and dy over each example's rows
([examples, width], two products) and lets go of y. After the backward, the per-example gradients of all layers of
one width are formed at once: Σ_t dy ⊙ y, less b ⊙ Σ_t dy, divided by w, is Σ_t dy ⊙ x̂, with no normalisation
recomputed. No [batch, tokens, width] tensor is kept beyond the hook. Layers found (by type, not by name):
``nn.LayerNorm`` and ``nn.RMSNorm`` over the last dimension, this project's ``FusedLayerNorm``/``FusedRMSNorm``, and
RMSNorm modules of other libraries (Hugging Face, litgpt) that hold one weight vector and an epsilon. Every layer's
formula is checked once against autograd: on the first measured micro-batch whose ``.grad`` is its own, the sum of
the per-example weight gradients must equal the weight's ``.grad``; a mismatch switches the estimate off (the caller
reads the count with its step record: no host read of its own).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from typing import Any

import torch

# A weight-gradient check passes when the per-example sum reproduces .grad to this relative error (fp32 maths;
# half-precision models cast x̂ to 16 bits before the weight multiplies it).
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 2e-2


def _is_norm_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a LayerNorm or RMSNorm over the last dimension with a trained weight vector."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or not weight.requires_grad:
        return False
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return len(module.normalized_shape) == 1
    # our fused norms: a model holding one has imported their module already (no Triton import here)
    fused = sys.modules.get("lightning_scaling.kernels.modules")
    if fused is not None and isinstance(module, (fused.FusedLayerNorm, fused.FusedRMSNorm)):
        return True
    # Other libraries' RMSNorm (Hugging Face's LlamaRMSNorm & co., litgpt's RMSNorm): one weight vector, an epsilon,
    # no children; their formula is then checked against autograd on the first step.
    own = dict(module.named_parameters(recurse=False))
    return (
        type(module).__name__.endswith("RMSNorm")
        and set(own) == {"weight"}
        and isinstance(_declared_epsilon(module), float)
        and not any(True for _ in module.children())
    )


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The module's parameter ``name``, detached (found as a tensor when the layer was recognised)."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value.detach()


def _declared_epsilon(module: torch.nn.Module) -> Any:
    """The module's epsilon attribute (Hugging Face's ``variance_epsilon``, else ``eps``), None when it has none."""
    eps = getattr(module, "variance_epsilon", None)
    return getattr(module, "eps", None) if eps is None else eps


class NormLayerProbe:
    """Finds a model's norm layers and measures per-example squared gradient norms of their parameters.

    Life cycle: :meth:`find` (once) -> :meth:`attach` -> per micro-batch :meth:`start` ... backward ...
    :meth:`collect` -> :meth:`detach`. Values are device scalars (no host read): the caller puts them in its books.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[str, torch.nn.Module]] = []  # (qualified name, module)
        self._handles: list[Any] = []
        self._active = False
        self._examples: int | None = None
        # per layer, from its hook: [Σ_t dy ⊙ y, Σ_t dy] per example ([examples, width] each; the second only when
        # the layer has a bias); a layer called twice in one forward adds up, as its gradient does
        self._sums: dict[int, list[torch.Tensor]] = {}
        self._checking = False
        self._mismatched: torch.Tensor | None = None  # layers whose Σ_i g_i missed .grad (device count)
        self.error: str | None = None  # why the last micro-batch could not be measured, in words

    # ------------------------------------------------------------------------------------------- set-up
    def find(self, model: torch.nn.Module) -> str:
        """Find the norm layers; returns a one-line description ('9 x LayerNorm', or '' when there are none)."""
        self.layers = [(name, m) for name, m in model.named_modules() if _is_norm_layer(m)]
        counts = Counter(type(m).__name__ for _, m in self.layers)
        return ", ".join(f"{n} x {cls}" for cls, n in counts.most_common())

    def attach(self) -> None:
        self.detach()
        for index, (_, module) in enumerate(self.layers):
            self._handles.append(module.register_forward_hook(self._forward_hook(index)))

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
        self._sums, self.error = {}, None

    def collect(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """After the backward: (Σ_i |g_i|², |Σ_i g_i|², examples) over all norm parameters, as the gradients
        flowed (the caller undoes the loss scale and Lightning's 1/k); None when nothing was measured.

        The per-example gradients are formed here, for all layers of one width at once (a handful of tensor ops
        however many layers there are): g_b = Σ_t dy, g_w = (Σ_t dy ⊙ y − b ⊙ g_b) / w (docs/math.md §5.5)."""
        self._active = False
        sums, self._sums = self._sums, {}
        if self.error is not None or not sums or self._examples is None:
            return None
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, parts in sums.items():
            module = self.layers[index][1]
            bias = getattr(module, "bias", None)
            trained = isinstance(bias, torch.Tensor) and bias.requires_grad
            groups.setdefault((parts[0].shape[-1], parts[0].dtype, len(parts), trained), []).append(index)
        example_sq: list[torch.Tensor] = []
        batch_sq: list[torch.Tensor] = []
        checks: list[torch.Tensor] = []
        for (_, dtype, parts, trained), indices in groups.items():
            modules = [self.layers[i][1] for i in indices]
            weight = torch.stack([_tensor(m, "weight") for m in modules]).to(dtype)[:, None]  # [layers, 1, width]
            dy_y = torch.stack([sums[i][0] for i in indices])  # [layers, examples, width]
            if parts == 2:  # y − b = x̂ ⊙ w
                shift = torch.stack([_tensor(m, "bias") for m in modules]).to(dtype)[:, None]
                grad_bias = torch.stack([sums[i][1] for i in indices])
                usable = weight.abs() > 1e-3 * shift.abs() + 1e-6
                grad_weight = torch.where(usable, (dy_y - shift * grad_bias) / weight, 0.0)
            else:
                usable = weight.abs() > 1e-6
                grad_weight = torch.where(usable, dy_y / weight, 0.0)
            per_example = [grad_weight, grad_bias] if parts == 2 and trained else [grad_weight]
            batch = [g.sum(1) for g in per_example]  # [layers, width]: Σ_i g_i, each layer's micro-batch gradient
            example_sq += [g.square().sum() for g in per_example]
            batch_sq += [g.square().sum() for g in batch]
            if self._checking:
                checks += self._check(modules, batch[0], usable[:, 0])
        if self._checking:
            self._mismatched = torch.stack(checks).sum() if checks else None
            self._checking = False
        return torch.stack(example_sq).sum(), torch.stack(batch_sq).sum(), self._examples

    def take_mismatched(self) -> torch.Tensor | None:
        """Layers whose formula missed autograd in the last check (a device count), once."""
        mismatched, self._mismatched = self._mismatched, None
        return mismatched

    # -------------------------------------------------------------------------------------------- hooks
    def _forward_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._active or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            if torch._C._current_graph_task_id() != -1:  # recomputed inside a backward (activation checkpointing)
                return
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            if output.dim() < 2 or output.shape[-1] != weight.shape[0]:
                return
            if output.shape[0] != self._examples:
                self.error = (
                    f"a norm layer's output leads with {output.shape[0]} rows for a micro-batch of "
                    f"{self._examples} samples (not batch-first)"
                )
                return
            output.register_hook(self._gradient_hook(index, module, output.detach(), output._version))

        return hook

    def _gradient_hook(self, index: int, module: torch.nn.Module, y: torch.Tensor, version: int) -> Any:
        def hook(dy: torch.Tensor) -> None:
            if not self._active:
                return
            if y._version != version:
                self.error = "a norm layer's output was changed in place after the layer ran"
                return
            try:
                self._measure(index, module, y, dy)
            except Exception as err:  # noqa: BLE001 - our bookkeeping never raises into the backward
                self.error = f"{type(err).__name__}: {err}"

        return hook

    def _measure(self, index: int, module: torch.nn.Module, y: torch.Tensor, dy: torch.Tensor) -> None:
        """Keep this layer's Σ_t dy ⊙ y and Σ_t dy per example, in fp32 (fp64 for a float64 model); the
        per-example gradients are formed from them in :meth:`collect`."""
        d = dy.detach()
        if y.dtype not in (torch.float32, torch.float64):  # half precision: the products and sums in fp32
            d, y = d.float(), y.float()
        elif d.dtype != y.dtype:
            d = d.to(y.dtype)
        if d.dim() != 3:  # [examples, rows, width]; dy has y's shape (this runs in the backward: no op to spare)
            d = d.reshape(y.shape[0], -1, y.shape[-1])
            y = y.reshape(d.shape)
        parts = [(d * y).sum(1)]
        if isinstance(getattr(module, "bias", None), torch.Tensor):  # y − b: a bias shifts y even when frozen
            parts.append(d.sum(1))
        previous = self._sums.get(index)
        self._sums[index] = parts if previous is None else [a + s for a, s in zip(previous, parts, strict=True)]

    @staticmethod
    def _check(modules: list[torch.nn.Module], grad_weight: torch.Tensor, usable: torch.Tensor) -> list[torch.Tensor]:
        """1.0 for each layer whose Σ_i g_i(weight) is not its weight's .grad on the coordinates measured, else 0.0
        (device tensors, no host read)."""
        flags = []
        for module, ours, measured in zip(modules, grad_weight, usable, strict=True):
            grad = module.weight.grad if isinstance(module.weight, torch.Tensor) else None
            if grad is None:
                continue
            want = torch.where(measured, grad.to(ours.dtype), 0.0)
            tol = CHECK_TOLERANCE.get(grad.dtype, HALF_TOLERANCE)
            flags.append(((ours - want).norm() > tol * want.norm() + 1e-30).to(torch.float32))
        return flags
