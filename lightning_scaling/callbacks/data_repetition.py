"""DataRepetition: epochs over the unique data, the effective data D' they are worth, and a warning when the
run will repeat its data past the point where repetition stops paying (Muennighoff et al. 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_scaling import metric_names
from lightning_scaling.argument_checks import positive_float, positive_int
from lightning_scaling.callbacks._base import LedgerCallback
from lightning_scaling.callbacks._common import (
    TokensFn,
    count_samples,
    first_tensor,
    planned_optimizer_steps,
    remaining_micro_batches,
    untouched_random_state,
)
from lightning_scaling.callbacks._ledger import MICRO_BATCHES, NO_SAMPLES, SAMPLES, StepRecord
from lightning_scaling.run_report import format_count

SKETCH_FAILED = "repetition/sketch_failed"
_STATE_VERSION = 1


class DataRepetition(LedgerCallback):
    r"""Track how many times a run repeats its data and what the repeats are worth.

    Unique data ``U`` (tokens) is ``unique_tokens=`` when given; else ``len(dataset)`` × the mean tokens per
    sample seen (tokens counted as :class:`TokenBudget` counts them, non-padding tokens when the batch carries
    an ``attention_mask``); else, for a dataset without a length (a stream, an ``IterableDataset``), the
    distinct samples seen, estimated by a HyperLogLog sketch over 64-bit hashes of each sample's token ids
    (:mod:`lightning_scaling.estimators.distinct_samples`), × the mean tokens per sample.

    Logged at the trainer's logging interval (global over data-parallel ranks and accumulation micro-batches):

    - ``scaling/epochs``: tokens seen / U (for a map-style dataset with a length: samples seen / len(dataset))
    - ``scaling/effective_tokens``: D', the fresh tokens the tokens seen are worth (Muennighoff 2023, eq. 5)
    - ``scaling/effective_tokens_per_param``: D' / parameters
    - ``scaling/repetition_value``: worth of the next repeated token against a fresh one, exp(−R_D/R*_D)
      (1 in the first epoch, 0.77 after 5 epochs, 0.38 after 16)
    - ``scaling/projected_epochs``: epochs at the end of the run (``trainer.estimated_stepping_batches``:
      max_steps / max_epochs); equals ``scaling/epochs`` when the end is unknown
    - ``scaling/distinct_fraction``: distinct samples seen / samples seen, when the sketch is on (every
      ``sketch_every_n_steps`` steps); about 1/epochs for data that cycles

    Warnings (rank zero, once each, at the step where the projection first crosses the threshold):
    ``warn_epochs`` (default 4: past it each repeat is worth visibly less than fresh data; Muennighoff et al.
    2023 find up to about 4 epochs nearly as good as unique data) and ``stop_epochs`` (default 40: a repeated
    token is then worth under 10% of a fresh one, and the effective data D' is within a few percent of its
    ceiling U·(1 + R*_D), the region Muennighoff et al. call worthless). Each states the value of the next
    repeated token and how much D' can still grow, and gives the data-constrained optimum (parameters and
    epochs) for the same compute (6·N·D) and unique data. When both thresholds are crossed at the same step only
    the ``stop_epochs`` warning is shown (both are recorded).

    With a sketch and no length, the projection assumes new distinct samples keep arriving at the rate seen
    between the last two sketch evaluations (1 for a fresh stream, 0 once the stream cycles).

    Args:
        unique_tokens: unique tokens in the training data; default: measured as above.
        tokens_fn: counts the training tokens of one batch (shared with :class:`TokenBudget`).
        sketch: estimate distinct samples with a HyperLogLog sketch. None (default): on for datasets without
            ``__len__``; True: always (also reports duplicates inside a map-style dataset as
            ``distinct_fraction``); False: never.
        sketch_precision: p; the sketch has 2**p one-byte registers, relative standard error 1.04/sqrt(2**p)
            (0.81% at the default 14). Under DDP the registers are max-reduced (2**p bytes) every
            ``sketch_every_n_steps`` steps.
        sketch_every_n_steps: optimizer steps between sketch estimates; default ``trainer.log_every_n_steps``.
        warn_epochs: warn when the run is projected past this many epochs (default 4: diminishing returns).
        stop_epochs: warn when the run is projected past this many epochs (default 40: repeats worth little).
        law: a :class:`lightning_scaling.laws.DataConstrainedLaw`; default: Muennighoff et al.'s C4 fit.
        params: model parameters; default: the unique parameters of the module (shared weights once).
    """

    def __init__(
        self,
        unique_tokens: float | None = None,
        tokens_fn: TokensFn | None = None,
        sketch: bool | None = None,
        sketch_precision: int = 14,
        warn_epochs: float = 4.0,
        stop_epochs: float = 40.0,
        law: Any = None,
        params: float | None = None,
        sketch_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.unique_tokens_arg = None if unique_tokens is None else positive_float("unique_tokens", unique_tokens)
        if tokens_fn is not None and not callable(tokens_fn):
            raise ValueError(f"tokens_fn must be callable (batch -> tokens), got {tokens_fn!r}")
        self.tokens_fn = tokens_fn
        if not (sketch is None or isinstance(sketch, bool)):
            raise ValueError(f"sketch must be None (auto), True or False, got {sketch!r}")
        self.sketch_arg = sketch
        self.sketch_precision = positive_int("sketch_precision", sketch_precision)
        if not 4 <= self.sketch_precision <= 18:
            raise ValueError(f"sketch_precision must lie in [4, 18], got {sketch_precision!r}")
        self.sketch_every_n_steps = (
            None if sketch_every_n_steps is None else positive_int("sketch_every_n_steps", sketch_every_n_steps)
        )
        self.warn_epochs = positive_float("warn_epochs", warn_epochs)
        self.stop_epochs = positive_float("stop_epochs", stop_epochs)
        if self.stop_epochs <= self.warn_epochs:
            raise ValueError(f"stop_epochs must be > warn_epochs ({self.warn_epochs:g}), got {stop_epochs!r}")
        if law is not None and not all(
            callable(getattr(law, name, None)) for name in ("effective_tokens", "repetition_value", "compute_optimal")
        ):
            raise ValueError(
                f"law must be a DataConstrainedLaw (effective_tokens, repetition_value, compute_optimal), got {law!r}"
            )
        self.law = law
        self.params_arg = None if params is None else positive_float("params", params)

        # run configuration, found at train start
        self.params: float | None = self.params_arg
        self.dataset_len: int | None = None
        self.sketch_on = False
        self._sketch: Any = None  # a lightning_scaling.estimators.distinct_samples.HyperLogLog while the sketch is on
        self._planned_steps: int | None = None
        # checkpointed state: global totals, identical on every rank
        self.tokens = 0
        self.samples = 0
        self.global_steps = 0  # trainer.global_step advances counted by this callback
        self.warned: dict[str, int] = {}  # "warn"/"stop" -> global step where the projection first crossed
        self.distinct: float | None = None  # distinct samples seen (sketch estimate)
        self.fresh_rate: float | None = None  # new distinct samples per sample, between the last two estimates
        self._snapshot: tuple[int, float] | None = None  # (samples, distinct) at the last estimate
        self._estimate_step = 0  # global step of the last sketch estimate
        self._loaded_registers: torch.Tensor | None = None
        self._rule: str = "tokens"  # this part always counts tokens: its ledger slot is never None
        self._batches_done_in_epoch = 0
        self._fit_tokens = 0  # tokens and micro-batches of this fit (a resumed run projects from its own pace)
        self._fit_micro_batches = 0
        self._law_values_stale = False
        # latest numbers (see summary())
        self.unique_tokens: float | None = None
        self.epochs: float | None = None
        self.effective_tokens: float | None = None
        self.effective_tokens_per_param: float | None = None
        self.repetition_value: float | None = None
        self.projected_tokens: float | None = None
        self.projected_unique_tokens: float | None = None
        self.projected_epochs: float | None = None
        self.distinct_fraction: float | None = None

    # ------------------------------------------------------------------------- hooks, in the order they run
    @override
    def _on_setup_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.ledger is not None
        self._rule = self.ledger.token_rule(self.tokens_fn)
        self.ledger.declare(SKETCH_FAILED)
        # Before the strategy wraps or shards the model, so FSDP counts full shapes (as TokenBudget does).
        if self.params_arg is None:
            self.params = _count_params(pl_module)

    @override
    def _on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.params_arg is None and not self.params:  # layers built in configure_model
            self.params = _count_params(pl_module)
        self.dataset_len = _dataset_length(trainer.train_dataloader)
        self.sketch_on = self.sketch_arg if self.sketch_arg is not None else self.dataset_len is None
        if self.sketch_on:
            from lightning_scaling.estimators.distinct_samples import HyperLogLog

            self._sketch = HyperLogLog(self.sketch_precision, device=trainer.strategy.root_device)
            if self._loaded_registers is not None:
                if self._loaded_registers.numel() == self._sketch.m:
                    self._sketch.registers = self._loaded_registers.to(self._sketch.registers).clone()
                else:
                    self._warn.warn(
                        "sketch-precision",
                        "the checkpoint's sketch has another precision; distinct samples are counted afresh.",
                    )
                    self._reset_sketch_state()
        elif self.distinct is not None:
            self._reset_sketch_state()
        self._loaded_registers = None
        if self.unique_tokens_arg is None and self.dataset_len is None and not self.sketch_on:
            self._warn.warn(
                "no-unique",
                "the training data has no length and the sketch is off, so epochs are unknown; pass "
                f"{self.option_hint('unique_tokens')} or {self.option_hint('sketch', 'True')}.",
            )
        if self.law is None:
            from lightning_scaling.laws.definitions import DataConstrainedLaw

            self.law = DataConstrainedLaw()
        self._planned_steps = planned_optimizer_steps(trainer)
        self._fit_tokens = self._fit_micro_batches = 0

    @override
    def _on_micro_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batches_done_in_epoch = batch_idx + 1
        if self._sketch is None:
            return
        try:
            rows = first_tensor(batch)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            mask = mask if isinstance(mask, torch.Tensor) and rows is not None and mask.shape == rows.shape else None
            self._sketch.add_rows(rows, mask)
        except Exception:  # noqa: BLE001 - counted in the step record, acted on by every rank together
            assert self.ledger is not None
            self.ledger.add(SKETCH_FAILED, 1)

    @override
    def _on_step(self, trainer: Trainer, pl_module: LightningModule, record: StepRecord) -> dict[str, float] | None:
        if not self._take_counts(trainer, record):
            return None
        if self._sketch is not None:
            every = self.sketch_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50) or 50), 1)
            due = self.distinct is None or trainer.global_step // every > self._estimate_step // every
            if due or record.steps == 0:
                if trainer.world_size > 1:  # the sketch's registers merge by max: a collective of its own,
                    # only at the sketch's cadence (every ``sketch_every_n_steps`` steps)
                    registers = self._sketch.registers
                    if torch.distributed.is_available() and torch.distributed.is_initialized():
                        torch.distributed.all_reduce(registers, op=torch.distributed.ReduceOp.MAX)  # no barrier
                    else:
                        self._sketch.registers = trainer.strategy.reduce(registers, reduce_op="max")
                self._estimate_distinct()
                self._estimate_step = trainer.global_step
        self._update(trainer)
        if record.steps == 0:
            return None
        self._check_warnings(trainer)
        return self._metrics() if record.log_now else None

    @override
    def _on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._update_law_values()

    @override
    def state_dict(self) -> dict[str, Any]:
        registers = None
        if self._sketch is not None:
            registers = self._sketch.registers.detach().cpu().clone()
        elif self._loaded_registers is not None:
            registers = self._loaded_registers
        return {
            "version": _STATE_VERSION,
            "tokens": self.tokens,
            "samples": self.samples,
            "global_steps": self.global_steps,
            "warned": dict(self.warned),
            "distinct": self.distinct,
            "fresh_rate": self.fresh_rate,
            "snapshot": None if self._snapshot is None else list(self._snapshot),
            "estimate_step": self._estimate_step,
            "registers": registers,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.samples = int(state_dict.get("samples", 0))
        self.global_steps = int(state_dict.get("global_steps", 0))
        self.warned = {str(k): int(v) for k, v in dict(state_dict.get("warned", {})).items()}
        self.distinct = state_dict.get("distinct")
        self.fresh_rate = state_dict.get("fresh_rate")
        snapshot = state_dict.get("snapshot")
        self._snapshot = None if snapshot is None else (int(snapshot[0]), float(snapshot[1]))
        self._estimate_step = int(state_dict.get("estimate_step", 0))
        registers = state_dict.get("registers")
        self._loaded_registers = None if registers is None else registers.detach().cpu().to(torch.uint8).clone()
        # the warnings already given stay given
        for key in self.warned:
            self._warn.seen.add(key)

    # ---------------------------------------------------------------------------------------------- public

    def summary(self) -> dict[str, Any]:
        """The latest numbers: ``tokens``/``samples`` seen (all ranks), ``unique_tokens`` (U), ``epochs``,
        ``effective_tokens`` (D', tokens), ``effective_tokens_per_param``, ``repetition_value``,
        ``projected_tokens``/``projected_epochs`` (end of run), ``distinct_samples`` and ``distinct_fraction``
        (sketch), ``params``, and ``warned`` (threshold -> the optimizer step where it was crossed)."""
        self._update_law_values()
        return {
            "tokens": self.tokens,
            "samples": self.samples,
            "unique_tokens": self.unique_tokens,
            "epochs": self.epochs,
            "effective_tokens": self.effective_tokens,
            "effective_tokens_per_param": self.effective_tokens_per_param,
            "repetition_value": self.repetition_value,
            "projected_tokens": self.projected_tokens,
            "projected_epochs": self.projected_epochs,
            "distinct_samples": self.distinct,
            "distinct_fraction": self.distinct_fraction,
            "params": self.params,
            "warned": dict(self.warned),
        }

    # ------------------------------------------------------------------------------------------- internals

    def _reset_sketch_state(self) -> None:
        self.distinct = self.fresh_rate = self._snapshot = None
        self._estimate_step = 0

    def _take_counts(self, trainer: Trainer, record: StepRecord) -> bool:
        """Add the step's counts (already summed over ranks by the ledger). Every rank takes the same decisions
        from the same record."""
        no_tokens = record[f"{self._rule}/uncountable"] > 0
        no_samples = record[NO_SAMPLES] > 0
        self.tokens += int(record.tokens(self._rule))
        self.samples += int(record[SAMPLES])
        self.global_steps += record.steps
        self._fit_tokens += int(record.tokens(self._rule))
        self._fit_micro_batches += int(record[MICRO_BATCHES])
        if no_tokens or (no_samples and self.unique_tokens_arg is None):
            what = "tokens" if no_tokens else "samples (the leading dimension of the token tensor)"
            self._warn.warn(
                "uncountable",
                f"cannot count the {what} of a batch; pass {self.option_hint('tokens_fn')} (and "
                f"{self.option_hint('unique_tokens')} when a batch has no token tensor). Switched off.",
            )
            self.enabled = False
            return False
        if (record[SKETCH_FAILED] or no_samples) and self._sketch is not None:
            self._warn.warn("sketch-failed", "could not hash a batch's samples; the distinct-sample sketch is off.")
            self._sketch = None
            self.sketch_on = False
            self._reset_sketch_state()
        return True

    def _estimate_distinct(self) -> None:
        if self._sketch is None or self.samples <= 0:
            return
        estimate = self._sketch.estimate()  # unclamped, so that successive estimates compare like with like
        if self._snapshot is None:
            rate = estimate / self.samples
        elif self.samples > self._snapshot[0]:
            rate = (estimate - self._snapshot[1]) / (self.samples - self._snapshot[0])
        else:
            rate = self.fresh_rate if self.fresh_rate is not None else 1.0
        self.fresh_rate = min(max(rate, 0.0), 1.0)
        self._snapshot = (self.samples, estimate)
        self.distinct = min(estimate, float(self.samples))

    def _update(self, trainer: Trainer) -> None:
        if self.tokens <= 0 or (self.samples <= 0 and self.unique_tokens_arg is None):
            return
        per_sample = self.tokens / max(self.samples, 1)  # mean training tokens per sample
        growth = 0.0  # unique tokens per remaining training token
        if self.unique_tokens_arg is not None:
            unique = self.unique_tokens_arg
        elif self.dataset_len is not None:
            unique = self.dataset_len * per_sample
        elif self.distinct is not None:
            unique = max(self.distinct, 1.0) * per_sample
            growth = self.fresh_rate or 0.0
        else:
            return
        self.unique_tokens = unique
        self.distinct_fraction = None if self.distinct is None else min(self.distinct / max(self.samples, 1), 1.0)
        self.epochs = self.tokens / unique
        micro_left = remaining_micro_batches(trainer, self._batches_done_in_epoch)
        if self._planned_steps is not None and micro_left is not None and self._fit_micro_batches > 0:
            remaining = micro_left * self._fit_tokens / self._fit_micro_batches
            self.projected_tokens = self.tokens + remaining
            self.projected_unique_tokens = unique + growth * remaining
        else:
            self.projected_tokens, self.projected_unique_tokens = float(self.tokens), unique
        self.projected_epochs = self.projected_tokens / self.projected_unique_tokens
        self._law_values_stale = True

    def _update_law_values(self) -> None:
        """D' and the value of a repeat, under the law (a few numpy calls: at logging steps and for the report)."""
        if not self._law_values_stale or self.unique_tokens is None:
            return
        self._law_values_stale = False
        law, unique = self.law, self.unique_tokens
        # Muennighoff 2023, eq. 5: D' = U + U·R*_D·(1 − exp(−R_D/R*_D)), R_D = epochs − 1
        self.effective_tokens = float(law.effective_tokens(self.tokens, unique))
        # Muennighoff 2023, derivative of eq. 5: dD'/dD = exp(−R_D/R*_D)
        self.repetition_value = float(law.repetition_value(self.tokens, unique))
        self.effective_tokens_per_param = self.effective_tokens / self.params if self.params else None

    def _check_warnings(self, trainer: Trainer) -> None:
        if self.projected_epochs is None:
            return
        crossed = [
            key
            for key, threshold in (("warn", self.warn_epochs), ("stop", self.stop_epochs))
            if key not in self.warned and self.projected_epochs > threshold
        ]
        for key in crossed:
            self.warned[key] = trainer.global_step
        if "stop" in crossed:
            self._warn.seen.add("warn")  # the stronger warning says it all
            self._warn.warn("stop", self._advice(self.stop_epochs, "further repeats are worth little"))
        elif "warn" in crossed:
            self._warn.warn("warn", self._advice(self.warn_epochs, "each further epoch is worth less than fresh data"))

    def _advice(self, threshold: float, meaning: str) -> str:
        unique = self.projected_unique_tokens or self.unique_tokens or 1.0
        tokens = self.projected_tokens or float(self.tokens)
        law = self.law
        # Muennighoff 2023, eq. 5 and its derivative: D' = U + U·R*_D·(1 − exp(−R_D/R*_D)), dD'/dD = exp(−R_D/R*_D)
        end_value = float(law.repetition_value(tokens, unique))
        effective = float(law.effective_tokens(tokens, unique))
        ceiling = unique * (1.0 + float(getattr(law, "r_star_d", math.inf)))  # D' as the epochs grow without end
        headroom = ceiling / effective - 1.0 if effective > 0 else math.nan
        text = (
            f"the run is projected to {self.projected_epochs:.1f} epochs over {format_count(unique)} unique tokens "
            f"({format_count(tokens)} training tokens), past {threshold:g} epochs: {meaning}. By the end a repeated "
            f"token is worth {end_value:.0%} of a fresh one, the {format_count(tokens)} tokens are worth "
            f"{format_count(effective)} fresh ones (D'), and more repeats can raise D' by at most {headroom:.0%} "
            "(Muennighoff et al. 2023, eq. 5)."
        )
        if self.params:
            flops = 6.0 * self.params * tokens  # C ≈ 6·N·D (Kaplan 2020, Table 1)
            try:
                best = law.compute_optimal(flops, unique)
                text += (
                    f" For the same compute ({format_count(flops)} FLOPs, 6·N·D) and unique data, the "
                    f"data-constrained optimum is {format_count(float(best.params))} parameters for "
                    f"{float(best.epochs):.1f} epochs ({format_count(float(best.tokens))} tokens) instead of "
                    f"{format_count(self.params)} parameters for {self.projected_epochs:.1f} epochs."
                )
            except Exception:  # noqa: BLE001 - the advice is optional, the warning is not
                pass
        return text + " To do better: add unique data, or move the model size toward that optimum."

    def _metrics(self) -> dict[str, float]:
        self._update_law_values()
        metrics = {
            metric_names.EPOCHS: self.epochs,
            metric_names.EFFECTIVE_TOKENS: self.effective_tokens,
            metric_names.EFFECTIVE_TOKENS_PER_PARAM: self.effective_tokens_per_param,
            metric_names.REPETITION_VALUE: self.repetition_value,
            metric_names.PROJECTED_EPOCHS: self.projected_epochs,
            metric_names.DISTINCT_FRACTION: self.distinct_fraction,
        }
        return {name: float(value) for name, value in metrics.items() if value is not None and math.isfinite(value)}


def _count_params(pl_module: LightningModule) -> float | None:
    from lightning_scaling.flops.counter import count_parameters

    return float(count_parameters(pl_module)) or None


def _dataset_length(loader: Any) -> int | None:
    """Samples in the training dataset of a single ``DataLoader`` over a map-style dataset, else None."""
    dataset = getattr(loader, "dataset", None) if isinstance(loader, DataLoader) else None
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    rows_per_item = 1
    if loader.batch_size is None and loader.batch_sampler is None:
        # batch_size=None: each item is already a batch, so len(dataset) counts batches, not samples
        try:
            with untouched_random_state():
                rows_per_item = count_samples(dataset[0]) or 0
        except Exception:  # noqa: BLE001 - cannot look inside: let the sketch estimate instead
            return None
        if rows_per_item <= 0:
            return None
    try:
        length = len(dataset)
    except (TypeError, NotImplementedError):
        return None
    return int(length) * rows_per_item if length > 0 else None
