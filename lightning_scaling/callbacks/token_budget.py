"""TokenBudget: tokens seen, tokens per parameter against the Chinchilla rule, projected to the end of the run."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import default_collate
from typing_extensions import override

from lightning_scaling import metric_names
from lightning_scaling.callbacks._base import LedgerCallback, guarded
from lightning_scaling.callbacks._common import (
    TokensFn,
    count_tokens,
    planned_optimizer_steps,
    remaining_micro_batches,
    token_rule,
    untouched_random_state,
)
from lightning_scaling.callbacks._ledger import MICRO_BATCHES, SUPERVISED, StepRecord
from lightning_scaling.run_report import format_count, format_duration, format_flops, format_percent, law_name


class TokenBudget(LedgerCallback):
    r"""Count training tokens and compare the run with the compute-optimal allocation.

    Tokens are the non-padding tokens of a batch's ``attention_mask`` when it has one, else the element count
    of its integer token tensor; ``tokens_fn(batch)`` counts any other batch. Parameters are all unique
    trainable and frozen parameters (tied weights once; full shapes under FSDP: counted before sharding), or
    the non-embedding ones with ``non_embedding=True`` (Kaplan's convention).

    Logged at the trainer's logging interval (``log_every_n_steps``; totals over data-parallel ranks):

    - ``scaling/tokens``: training tokens so far
    - ``scaling/params``: parameters counted (constant)
    - ``scaling/tokens_per_param``: tokens so far / parameters
    - ``scaling/projected_tokens_per_param``: the same at the end of the run (``trainer.estimated_stepping_batches``)
    - ``scaling/compute_overhead``: extra compute of the projected run over the compute-optimal run that reaches
      the same loss, under ``law`` (de Vries 2023 from Hoffmann et al. 2022 eq. 2; 0.2 = 20% more)

    At train start it prints a pre-flight summary (planned tokens, tokens per parameter, FLOPs) and, once
    ``projection_warmup_steps`` steps have run, the projected wall-clock. It warns once (rank zero) when the
    projected run ends under ``tokens_per_param`` with an overhead above ``overhead_threshold``, and reports
    once (information) when it ends above ``overtrained_factor`` x ``tokens_per_param``.

    Args:
        tokens_fn: counts the training tokens of one batch (this rank, one micro-batch).
        non_embedding: count non-embedding parameters instead of all.
        law: a :class:`lightning_scaling.laws.ChinchillaLaw` (default: Besiroglu et al. 2024's refit, whose
            optimum sits at about 20 tokens per parameter), for the overhead and the advice.
        tokens_per_param: the rule of thumb (Hoffmann et al. 2022, Table 3: about 20).
        overhead_threshold: warn only when the projected compute overhead exceeds this fraction.
        overtrained_factor: report when the run ends above this multiple of ``tokens_per_param``.
        inference_tokens: tokens the model will serve; compares with the inference-aware optimum
            (Sardana et al. 2023) instead of the training-only one.
        params: the parameter count to use, overriding the count from the module.
        projection_warmup_steps: optimizer steps before projecting (tokens/step and step time settle).
    """

    def __init__(
        self,
        tokens_fn: TokensFn | None = None,
        non_embedding: bool = False,
        law: Any = None,
        tokens_per_param: float = 20.0,
        overhead_threshold: float = 0.10,
        overtrained_factor: float = 5.0,
        inference_tokens: float | None = None,
        params: int | None = None,
        projection_warmup_steps: int = 10,
    ) -> None:
        from lightning_scaling.argument_checks import non_negative_float, positive_float, positive_int

        super().__init__()
        if tokens_fn is not None and not callable(tokens_fn):
            raise ValueError(f"tokens_fn must be a callable taking a batch, got {tokens_fn!r}")
        self.tokens_fn = tokens_fn
        if not isinstance(non_embedding, bool):
            raise ValueError(f"non_embedding must be True or False, got {non_embedding!r}")
        self.non_embedding = non_embedding
        self.law = _resolve_law(law)
        self.tokens_per_param = positive_float("tokens_per_param", tokens_per_param)
        self.overhead_threshold = non_negative_float("overhead_threshold", overhead_threshold)
        self.overtrained_factor = positive_float("overtrained_factor", overtrained_factor)
        self.inference_tokens = (
            None if inference_tokens is None else positive_float("inference_tokens", inference_tokens)
        )
        self.params_override = None if params is None else positive_int("params", params)
        self.projection_warmup_steps = positive_int("projection_warmup_steps", projection_warmup_steps)
        # checkpointed (global over ranks)
        self.tokens = 0
        self.supervised_tokens = 0  # labels that are not -100, when batches carry labels
        self.token_rule: str | None = None  # how tokens are counted, in words (see count_tokens)
        self.optimizer_steps = 0
        self.warned: list[str] = []
        # this fit only
        self.params: int | None = None
        self._rule: str = "tokens"  # this part always counts tokens: its ledger slot is never None
        self._fit_start_tokens = 0
        self._fit_micro_batches = 0
        self._batches_done_in_epoch = 0
        self._fit_start_steps = 0
        self._fit_start_time: float | None = None
        self.projected_tokens: float | None = None
        self.compute_overhead: float | None = None
        self.projected_seconds: float | None = None
        self.last_loss: float = math.nan  # mean training loss of the last optimizer step (as training_step returns it)

    # ------------------------------------------------------------------------- hooks, in the order they run
    @override
    def _on_setup_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.ledger is not None
        self._rule = self.ledger.token_rule(self.tokens_fn)
        # Before the strategy wraps or shards the model, so FSDP counts full shapes.
        self.params = self._count_params(pl_module)

    @override
    @guarded
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.params:  # layers built in configure_model: count now (DTensor numel is the full shape)
            self.params = self._count_params(pl_module)
        if self.law is None:
            from lightning_scaling.laws.definitions import DEFAULT_LAW

            self.law = DEFAULT_LAW
        for key in self.warned:
            self._warn.seen.add(key)

    @override
    def _on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start_tokens = self.tokens
        self._fit_start_steps = trainer.global_step
        self._fit_micro_batches = 0
        self._fit_start_time = time.perf_counter()
        self._preflight(trainer)

    @override
    def _on_micro_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batches_done_in_epoch = batch_idx + 1

    @override
    def _on_step(self, trainer: Trainer, pl_module: LightningModule, record: StepRecord) -> dict[str, float] | None:
        if record[f"{self._rule}/uncountable"] and f"{self._rule}/error" not in record.errors:
            self._warn.warn(
                "uncountable",
                f"cannot count the tokens of a batch of type {record.errors.get(f'{self._rule}/uncountable_type')}; "
                f"pass {self.option_hint('tokens_fn')}, a function that returns the number of training tokens in "
                "a batch.",
            )
        assert self.ledger is not None
        self.token_rule = self.ledger.rules_applied.get(self._rule, self.token_rule)
        self.tokens += int(record.tokens(self._rule))
        self.supervised_tokens += int(record[SUPERVISED])
        self._fit_micro_batches += int(record[MICRO_BATCHES])
        if record.steps == 0:
            return None
        self.optimizer_steps += record.steps
        self.last_loss = record.mean_loss
        if not self.params:
            return None
        steps_this_fit = trainer.global_step - self._fit_start_steps
        due = self.projected_tokens is None or record.log_now  # first chance, then at each log interval
        if due and steps_this_fit >= min(self.projection_warmup_steps, planned_optimizer_steps(trainer) or 1):
            self._project(trainer, steps_this_fit)
            self._advise()
        if not record.log_now:  # the metrics are built only when they are logged
            return None
        metrics = {
            metric_names.TOKENS: float(self.tokens),
            metric_names.PARAMS: float(self.params),
            metric_names.TOKENS_PER_PARAM: self.tokens / self.params,
        }
        if self.supervised_tokens:
            metrics[metric_names.SUPERVISED_TOKENS] = float(self.supervised_tokens)
        if self.projected_tokens is not None:
            metrics[metric_names.PROJECTED_TOKENS_PER_PARAM] = self.projected_tokens / self.params
        if self.compute_overhead is not None:
            metrics[metric_names.COMPUTE_OVERHEAD] = self.compute_overhead
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "optimizer_steps": self.optimizer_steps,
            "warned": list(self.warned),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.supervised_tokens = int(state_dict.get("supervised_tokens", 0))
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self.warned = list(state_dict.get("warned", []))

    # ------------------------------------------------------------------------------------------- helpers

    def summary(self) -> dict[str, Any]:
        """The numbers for the end-of-fit report (tokens, parameters, projection, overhead)."""
        return {
            "tokens": self.tokens,
            "params": self.params,
            "tokens_per_param": self.tokens / self.params if self.params else None,
            "projected_tokens": self.projected_tokens,
            "projected_tokens_per_param": self.projected_tokens / self.params
            if self.params and self.projected_tokens
            else None,
            "compute_overhead": self.compute_overhead,
            "projected_wall_clock_hours": self.projected_seconds / 3600 if self.projected_seconds else None,
            "non_embedding": self.non_embedding,
            "token_rule": self.token_rule,
            "supervised_tokens": self.supervised_tokens or None,
        }

    def _count_params(self, pl_module: LightningModule) -> int:
        if self.params_override is not None:
            return self.params_override
        from lightning_scaling.flops.counter import count_parameters

        return int(count_parameters(pl_module, non_embedding=self.non_embedding))

    def _project(self, trainer: Trainer, steps_this_fit: int) -> None:
        planned = planned_optimizer_steps(trainer)
        micro_left = remaining_micro_batches(trainer, self._batches_done_in_epoch)
        if planned is None or micro_left is None or steps_this_fit <= 0 or self._fit_micro_batches <= 0:
            return
        tokens_per_micro_batch = (self.tokens - self._fit_start_tokens) / self._fit_micro_batches
        remaining = max(planned - trainer.global_step, 0)
        self.projected_tokens = self.tokens + tokens_per_micro_batch * micro_left
        if self._fit_start_time is not None:
            seconds_per_step = (time.perf_counter() - self._fit_start_time) / steps_this_fit
            self.projected_seconds = seconds_per_step * remaining
            self._warn.info(
                "wall-clock",
                f"{steps_this_fit} steps in: {seconds_per_step:.3g} s per step, about "
                f"{format_duration(self.projected_seconds)} to go for the remaining {remaining} steps "
                f"({format_count(self.projected_tokens)} tokens in all).",
            )
        if self.projected_tokens > 0:
            overhead = float(self.law.compute_overhead(self.params, self.projected_tokens))
            self.compute_overhead = overhead if math.isfinite(overhead) else None

    def _advise(self) -> None:
        if self.projected_tokens is None or not self.params:
            return
        n, d = float(self.params), float(self.projected_tokens)
        ratio = d / n
        flops = 6 * n * d  # C = 6ND (Kaplan et al. 2020, Hoffmann et al. 2022 eq. 4's constraint)
        overhead = self.compute_overhead or 0.0
        if ratio < self.tokens_per_param and overhead > self.overhead_threshold:
            optimum = self.law.compute_optimal(flops)
            self._warn_persisted(
                "undertrained",
                f"this run is projected to end at {ratio:.3g} tokens per parameter ({format_count(d)} tokens for "
                f"{format_count(n)} parameters), under the ~{self.tokens_per_param:g}x rule, spending "
                f"{format_percent(overhead)} more compute than needed for the loss it will reach "
                f"({law_name(self.law)}). For the same {format_flops(flops)} FLOPs (6ND) the compute-optimal run "
                f"is a {format_count(optimum.params)}-parameter model on {format_count(optimum.tokens)} tokens; "
                f"or keep this model and train on {format_count(self.tokens_per_param * n)} tokens."
                + _extrapolation_note(self.law, n, d, " Both are extrapolations: the {law} was fitted on {range}."),
            )
        elif ratio > self.overtrained_factor * self.tokens_per_param:
            message = (
                f"this run is projected to end at {ratio:.0f} tokens per parameter, over "
                f"{self.overtrained_factor:g}x the ~{self.tokens_per_param:g}x rule (compute overhead "
                f"{format_percent(overhead)} for its loss). That is a fine choice when inference dominates the "
                "model's cost."
            )
            if self.inference_tokens is not None:
                from lightning_scaling.laws.definitions import inference_optimal

                target = float(self.law.loss(n, d))
                alt = inference_optimal(self.law, target, self.inference_tokens)
                ours = 6 * n * d + 2 * n * self.inference_tokens  # Sardana et al. 2023: training + inference FLOPs
                theirs = 6 * alt.params * alt.tokens + 2 * alt.params * self.inference_tokens
                message += (
                    f" With {format_count(self.inference_tokens)} inference tokens, the inference-aware optimum for "
                    f"the same loss is {format_count(float(alt.params))} parameters on "
                    f"{format_count(float(alt.tokens))} tokens, "
                    f"{(ours - theirs) / theirs:+.0%} total FLOPs compared with this run."
                )
            self._info_persisted("overtrained", message)

    def _warn_persisted(self, key: str, message: str) -> None:
        if self._warn.warn(key, message):
            self.warned.append(key)

    def _info_persisted(self, key: str, message: str) -> None:
        if self._warn.info(key, message):
            self.warned.append(key)

    def _preflight(self, trainer: Trainer) -> None:
        planned = planned_optimizer_steps(trainer)
        lines = [f"parameters: {format_count(self.params or 0)}" + (" (non-embedding)" if self.non_embedding else "")]
        per_step = self._estimate_tokens_per_step(trainer)
        if planned is not None:
            lines.append(f"planned optimizer steps: {planned}")
        if planned is not None and per_step is not None and self.params:
            tokens = self.tokens + per_step * max(planned - trainer.global_step, 0)
            flops = 6 * self.params * tokens  # C = 6ND
            optimum = self.law.compute_optimal(flops)
            lines += [
                f"planned tokens: {format_count(tokens)} ({format_count(per_step)} per step, from 8 samples or fewer)",
                f"planned tokens per parameter: {tokens / self.params:.3g} (rule of thumb: ~{self.tokens_per_param:g})",
                f"planned training FLOPs (6ND): {format_flops(flops)}; compute-optimal for that budget "
                f"({law_name(self.law)}): {format_count(optimum.params)} parameters on "
                f"{format_count(optimum.tokens)} tokens"
                + _extrapolation_note(
                    self.law, self.params, tokens, " (an extrapolation: the {law} was fitted on {range})"
                ),
            ]
        else:
            lines.append("planned tokens: known after the first steps")
        lines.append(f"tokens counted as: {self.token_rule or 'known after the first batch'}")
        rank_zero_info(f"{self.configured_as} pre-flight:\n  " + "\n  ".join(lines))

    def _estimate_tokens_per_step(self, trainer: Trainer) -> float | None:
        """Tokens per optimizer step from the dataloader's batch size and up to 8 samples spread over the dataset
        (each collated alone, as the loader would; no batch is drawn). Sets ``token_rule`` from them."""
        loader = trainer.train_dataloader
        if loader is None:  # not loaded yet
            return None
        try:
            dataset, batch_size = loader.dataset, loader.batch_size
            n = len(dataset)
            picks = sorted({round(i * (n - 1) / 7) for i in range(8)}) if n > 1 else [0]
            counts = []
            for index in picks:
                with untouched_random_state():
                    item = dataset[index]
                one = default_collate([item])  # a batch of one sample
                self.token_rule = self.token_rule or token_rule(one, self.tokens_fn)
                count = count_tokens(one, self.tokens_fn, lazy=True)
                if count is None:
                    return None
                counts.append(torch.as_tensor(count, dtype=torch.float64))
            per_sample = float(torch.stack(counts).mean())  # one read of the device, not one per sample
        except Exception:  # noqa: BLE001 - iterable datasets, custom samplers: known after the first steps
            return None
        if not per_sample or not batch_size:
            return None
        return float(per_sample * batch_size * trainer.accumulate_grad_batches * trainer.world_size)


def _resolve_law(law: Any) -> Any:
    """A law object, a preset name ("besiroglu", "hoffmann", "muennighoff") or None (the default law)."""
    if law is None:
        return None
    if isinstance(law, str):
        from lightning_scaling.laws.definitions import get_law

        return get_law(law)
    if not all(callable(getattr(law, name, None)) for name in ("loss", "compute_optimal", "compute_overhead")):
        raise ValueError(
            f"law must be a ChinchillaLaw (a preset such as lightning_scaling.laws.DEFAULT_LAW, a name such as "
            f"'besiroglu', or a fitted law from load_law), got {law!r}"
        )
    return law


def _extrapolation_note(law: Any, params: float, tokens: float, template: str) -> str:
    """``template`` filled with the law's name and fitted range when (params, tokens) lies beyond the runs a preset
    law was fitted on (``laws.FittedRange.outside``), else ""."""
    from lightning_scaling.laws.definitions import fitted_range

    found = fitted_range(law)
    if found is None or params <= 0 or tokens <= 0 or not found.outside(params, tokens):
        return ""
    return template.format(law=law_name(law), range=found.describe())
