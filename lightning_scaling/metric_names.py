"""The names under which the callbacks log their metrics, defined once (units after each).

The callbacks log them, the run report reads them back, and :mod:`lightning_scaling.laws.runs` finds them in a
``CSVLogger``'s ``metrics.csv``. Pure: imports nothing.
"""

# FlopCounter
FLOPS = "scaling/flops"  # cumulative model FLOPs of the run, all ranks
FLOPS_PER_STEP = "scaling/flops_per_step"  # model FLOPs of the last optimizer step, all ranks
FLOPS_PER_SEC = "scaling/flops_per_sec"  # model FLOP/s over the last window of optimizer steps, all ranks
MFU = "scaling/mfu"  # model FLOPs utilisation, a fraction of the devices' dense peak
HARDWARE_FLOPS = "scaling/hardware_flops"  # cumulative FLOPs including activation-checkpointing recomputation
FLOPS_ANALYTIC = "scaling/flops_analytic"  # cumulative analytic FLOPs (Chinchilla App. F)

# TokenBudget
TOKENS = "scaling/tokens"  # training tokens so far, all ranks
PARAMS = "scaling/params"  # parameters counted
TOKENS_PER_PARAM = "scaling/tokens_per_param"  # tokens so far / parameters
PROJECTED_TOKENS_PER_PARAM = "scaling/projected_tokens_per_param"  # tokens per parameter at the end of the run
COMPUTE_OVERHEAD = "scaling/compute_overhead"  # extra compute over the compute-optimal run at the same loss
SUPERVISED_TOKENS = "scaling/supervised_tokens"  # tokens with a label (not masked out of the loss)

# GradientNoiseScale
GNS = "scaling/gns"  # B_simple, in samples
GNS_TOKENS = "scaling/gns_tokens"  # B_simple, in tokens
GNS_NORM_LAYERS = "scaling/gns_norm_layers"  # B_simple from the norm layers' per-example gradients, in samples
GRAD_SQ = "scaling/grad_sq"  # smoothed |G|² estimate
GRAD_TRACE_COV = "scaling/grad_trace_cov"  # smoothed tr(Σ) estimate (per-sample gradient covariance)
BATCH_SIZE = "scaling/batch_size"  # global samples per optimizer step
BATCH_TOKENS = "scaling/batch_tokens"  # global tokens per optimizer step
KAPLAN_CRITICAL_BATCH_TOKENS = "scaling/kaplan_critical_batch_tokens"  # Kaplan et al. 2020 eq. 1.4, tokens

# DataRepetition
EPOCHS = "scaling/epochs"  # passes over the unique data so far
EFFECTIVE_TOKENS = "scaling/effective_tokens"  # D', fresh tokens the tokens seen are worth (Muennighoff 2023)
EFFECTIVE_TOKENS_PER_PARAM = "scaling/effective_tokens_per_param"  # D' / parameters
REPETITION_VALUE = "scaling/repetition_value"  # worth of the next repeated token against a fresh one, 0 to 1
PROJECTED_EPOCHS = "scaling/projected_epochs"  # epochs at the end of the run
DISTINCT_FRACTION = "scaling/distinct_fraction"  # distinct samples seen / samples seen

# BatchSizeSchedule
ACCUMULATE_GRAD_BATCHES = "scaling/accumulate_grad_batches"  # micro-batches per optimizer step
GLOBAL_BATCH = "scaling/global_batch"  # samples per optimizer step, all ranks
LR_FACTOR = "scaling/lr_factor"  # product of the learning-rate factors applied so far

# ScalingMonitor
REPORT_PICTURE = "scaling/report"  # the report's picture in TensorBoard and Weights & Biases
