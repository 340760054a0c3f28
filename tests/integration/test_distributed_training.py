"""Multi-process training with ScalingMonitor.

2-process DDP on CPU (gloo): totals equal a 1-process run with the same global batch, with and without
gradient accumulation, identical on every rank, and each of our warnings printed once, not once per rank.
FSDP: Lightning's FSDPStrategy (FSDP1) refuses the CPU, so fully-sharded training runs as FSDP2
(``fully_shard``) under Lightning's ModelParallelStrategy on CPU/gloo: parameters counted from full shapes,
FLOPs and tokens right, and GradientNoiseScale steps aside with exactly one warning.

The distributed runs share one subprocess (``python script.py``: Lightning's subprocess launcher starts the
second rank), so the cost of starting processes is paid once and each run's stderr can be read whole."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from gpt import GPTLightningModule
from helpers import TINY, HFLlamaModule, hf_padded_batches, target_tokens
from helpers import quick_trainer as _trainer
from helpers import token_rows as _data
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import ScalingMonitor
from lightning_scaling.flops.counter import count_parameters

TESTS = Path(__file__).resolve().parents[1]
EXAMPLES = TESTS.parent / "examples"


UNDERTRAINED = "ScalingMonitor (tokens): this run is projected to end at"


GNS_ASIDE = "ScalingMonitor (noise_scale): ModelParallelStrategy does not expose"


SCRIPT = textwrap.dedent('''
    import json, os, sys
    import lightning as L, torch
    from torch.utils.data import DataLoader
    from gpt import GPT, GPTConfig, GPTLightningModule
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_scaling.callbacks import ScalingMonitor

    TINY = GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64)
    OUT = sys.argv[1]
    RANK0 = os.environ.get("LOCAL_RANK", "0") == "0"
    data = torch.randint(0, 256, (64, 17), generator=torch.Generator().manual_seed(0))

    def target_tokens(batch):  # a tensor, as a mask sum would be: counted lazily and reduced on the device
        return torch.ones_like(batch[:, 1:]).sum()

    def shard(module, mesh):
        from torch.distributed.fsdp import fully_shard
        for block in module.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)

    class ShardedGPT(GPTLightningModule):
        """Built whole in __init__, sharded with FSDP2 in configure_model."""
        def configure_model(self):
            shard(self.model, self.device_mesh["data_parallel"])

    class LazyShardedGPT(GPTLightningModule):
        """Layers built in configure_model (the FSDP way for big models): nothing to count at setup."""
        def __init__(self, config):
            super().__init__(config)
            del self.model
        def configure_model(self):
            if not hasattr(self, "model"):
                self.model = GPT(self.config, use_kernels=False)
                shard(self.model, self.device_mesh["data_parallel"])

    # every collective Python code starts during a fit (DDP's own gradient all-reduce runs in C++ and is not seen)
    COLLECTIVES = [0]
    for _name in ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                  "broadcast_object_list", "reduce", "reduce_scatter_tensor", "barrier", "gather", "scatter"):
        def _counted(*args, _real=getattr(torch.distributed, _name), **kwargs):
            COLLECTIVES[0] += 1
            return _real(*args, **kwargs)
        setattr(torch.distributed, _name, _counted)

    def run(name, module, strategy, batch_size, steps, accumulate=1, with_monitor=True):
        if RANK0:
            print(f"=== begin {name} ===", file=sys.stderr, flush=True)
        monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0}) \
            if with_monitor else None
        before = COLLECTIVES[0]
        trainer = L.Trainer(callbacks=[monitor] if monitor else [], max_steps=steps, accumulate_grad_batches=accumulate,
                            strategy=strategy, accelerator="cpu", devices=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=os.path.join(os.path.dirname(OUT), name))
        trainer.fit(module, DataLoader(data, batch_size=batch_size, shuffle=False))
        collectives = COLLECTIVES[0] - before
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.parameters())
        if monitor is None:
            torch.distributed.barrier()
            if RANK0:
                print(f"=== end {name} ===", file=sys.stderr, flush=True)
            return {"collectives": collectives}
        result = {
            "collectives": collectives,
            "ledger_records": monitor.flops.optimizer_steps,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("scaling/")},
            "state": monitor.state_dict(),
            "params": monitor.tokens.params,
            "repetition": monitor.repetition.summary(),
            "gns_enabled": monitor.noise_scale.enabled,
            "flops_enabled": monitor.flops.enabled,
            "tokens_enabled": monitor.tokens.enabled,
            "gns_mode": monitor.noise_scale.mode,
            "gns_count": monitor.noise_scale.estimator.count,
            "local_params": local,
            "world_size": trainer.world_size,
        }
        torch.distributed.barrier()
        if RANK0:
            print(f"=== end {name} ===", file=sys.stderr, flush=True)
        return result

    results = {
        "ddp_plain": run("ddp_plain", GPTLightningModule(TINY), "ddp", 2, 4, accumulate=2, with_monitor=False),
        "ddp": run("ddp", GPTLightningModule(TINY), "ddp", 4, 4),
        "ddp_accumulate": run("ddp_accumulate", GPTLightningModule(TINY), "ddp", 2, 4, accumulate=2),
    }

    # Our own bookkeeping fails on rank 1 only (FlopCounter at its 2nd batch, GradientNoiseScale at its 2nd step):
    # switching off there alone would leave rank 0 waiting in the next all-reduce forever.
    import lightning_scaling.callbacks.flop_counter as flop_counter_module
    import lightning_scaling.callbacks.gradient_noise_scale as noise_scale_module

    def failing_on_rank_one(real, at_call):
        calls = [0]
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if not RANK0 and calls[0] == at_call:
                raise RuntimeError("injected failure on rank 1")
            return real(*args, **kwargs)
        return wrapped

    gns_class = noise_scale_module.GradientNoiseScale
    real_key, real_before_step = flop_counter_module._shape_key, gns_class._on_before_optimizer_step
    flop_counter_module._shape_key = failing_on_rank_one(real_key, 2)
    gns_class._on_before_optimizer_step = failing_on_rank_one(real_before_step, 2)
    results["one_rank_fails"] = run("one_rank_fails", GPTLightningModule(TINY), "ddp", 2, 4, accumulate=2)
    flop_counter_module._shape_key, gns_class._on_before_optimizer_step = real_key, real_before_step

    # A Hugging Face Llama (tiny config, random init) on padded batches with an attention mask
    try:
        import transformers
    except ImportError:  # not installed: the test that reads this run skips
        transformers = None

    from helpers import HFLlamaModule, hf_padded_batches

    def run_hf():
        if RANK0:
            print("=== begin hf_ddp ===", file=sys.stderr, flush=True)
        hf_monitor = ScalingMonitor(report=False, noise_scale={"warmup_steps": 0})
        hf_trainer = L.Trainer(callbacks=[hf_monitor], max_steps=4, accumulate_grad_batches=2, strategy="ddp",
                               accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                               use_distributed_sampler=True)
        hf_trainer.fit(HFLlamaModule(), DataLoader(hf_padded_batches(), batch_size=None, shuffle=False))
        out = {"state": hf_monitor.state_dict(), "gns_count": hf_monitor.noise_scale.estimator.count}
        torch.distributed.barrier()
        if RANK0:
            print("=== end hf_ddp ===", file=sys.stderr, flush=True)
        return out

    if transformers is not None:
        results["hf_ddp"] = run_hf()

    fsdp = lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    results["fsdp2"] = run("fsdp2", ShardedGPT(TINY), fsdp(), 4, 4)
    results["fsdp2_lazy"] = run("fsdp2_lazy", LazyShardedGPT(TINY), fsdp(), 4, 4)
    rank = torch.distributed.get_rank()
    with open(f"{OUT}.rank{rank}.json", "w") as fh:
        json.dump(results, fh, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
''')


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the four 2-rank trainings once; returns (results per rank, stderr split per run)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    script = tmp / "two_ranks.py"
    script.write_text(SCRIPT)
    out = tmp / "results"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), str(TESTS), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "always"  # Python would hide a repeated identical warning: show every one
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], cwd=tmp, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    sections = {}
    for name in ranks[0]:
        begin, end = f"=== begin {name} ===", f"=== end {name} ==="
        assert begin in proc.stderr and end in proc.stderr, proc.stderr[-4000:]
        sections[name] = proc.stderr.split(begin, 1)[1].split(end, 1)[0]
    return ranks, sections, proc.stderr


def _one_process(tmp_path, batch_size, accumulate=1):
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    trainer = _trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(), batch_size=batch_size, shuffle=False))
    return trainer, monitor


@pytest.mark.slow
@pytest.mark.parametrize("run, batch, accumulate", [("ddp", 8, 1), ("ddp_accumulate", 4, 2)])
def test_ddp_totals_equal_one_process_with_the_same_global_batch(two_ranks, tmp_path, run, batch, accumulate):
    ranks, _, _ = two_ranks
    trainer, monitor = _one_process(tmp_path, batch, accumulate)
    one = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("scaling/")}
    for rank, results in enumerate(ranks):
        two = results[run]
        assert two["world_size"] == 2
        assert two["metrics"]["scaling/tokens"] == one["scaling/tokens"] == 4 * 8 * 16, rank
        assert two["metrics"]["scaling/flops"] == pytest.approx(one["scaling/flops"], rel=1e-6), rank
        assert two["metrics"]["scaling/epochs"] == pytest.approx(one["scaling/epochs"]) == 0.5, rank
        assert two["metrics"]["scaling/params"] == one["scaling/params"], rank
        assert two["state"]["tokens"]["optimizer_steps"] == 4
        assert two["state"]["flops"]["total_flops"] == monitor.flops.total_flops
        assert two["repetition"]["samples"] == 32 and two["repetition"]["tokens"] == 4 * 8 * 16
        assert two["repetition"]["effective_tokens"] == pytest.approx(monitor.repetition.effective_tokens)
        # the noise scale compares each rank's micro-batch with the all-reduced gradient: global batch 8
        assert two["gns_enabled"] and two["gns_mode"] == "hooks" and two["gns_count"] == 4
        assert two["metrics"]["scaling/batch_size"] == 8.0
        assert math.isfinite(two["metrics"]["scaling/grad_sq"]) and math.isfinite(
            two["metrics"]["scaling/grad_trace_cov"]
        )
    # every rank holds the same global totals (the checkpoint of any rank is right)
    assert ranks[0][run]["state"]["tokens"] == ranks[1][run]["state"]["tokens"]
    assert ranks[0][run]["state"]["flops"]["total_flops"] == ranks[1][run]["state"]["flops"]["total_flops"]
    assert ranks[0][run]["state"]["noise_scale"] == ranks[1][run]["state"]["noise_scale"]


@pytest.mark.slow
def test_an_error_on_one_rank_switches_the_part_off_on_every_rank_without_a_hang(two_ranks):
    ranks, sections, _ = two_ranks
    for results in ranks:
        run = results["one_rank_fails"]
        assert run["state"]["tokens"]["optimizer_steps"] == 4  # the run finished: no rank waited forever
        assert not run["flops_enabled"] and not run["gns_enabled"]
        assert run["tokens_enabled"] and run["metrics"]["scaling/tokens"] == 4 * 8 * 16
    log = sections["one_rank_fails"]
    assert log.count("ScalingMonitor (flops): switched off on every rank after an error on 1 rank(s)") == 1
    assert log.count("ScalingMonitor (noise_scale): switched off on every rank after an error on 1 rank(s)") == 1
    assert "ScalingMonitor (flops), rank 1: error in on_micro_batch_start: RuntimeError: injected failure" in log


@pytest.mark.slow
def test_hugging_face_model_under_ddp_counts_as_one_process(two_ranks, tmp_path):
    """2 ranks x accumulation 2 against one process with accumulation 4: the same 16 padded batches."""
    pytest.importorskip("transformers", reason="transformers is not installed (test extra)")
    ranks, _, _ = two_ranks
    batches = hf_padded_batches()
    monitor = ScalingMonitor(report=False, noise_scale={"warmup_steps": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=4).fit(
            HFLlamaModule(), DataLoader(batches, batch_size=None, shuffle=False)
        )
    for results in ranks:
        state = results["hf_ddp"]["state"]
        assert (
            state["tokens"]["tokens"] == monitor.tokens.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
        )
        assert state["tokens"]["supervised_tokens"] == monitor.tokens.supervised_tokens
        assert state["flops"]["total_flops"] == pytest.approx(monitor.flops.total_flops, rel=1e-9)
        assert results["hf_ddp"]["gns_count"] == 4
    assert ranks[0]["hf_ddp"]["state"] == ranks[1]["hf_ddp"]["state"]


@pytest.mark.slow
def test_one_collective_per_optimizer_step(two_ranks):
    """The parts' numbers ride in one packed all-reduce per optimizer step (the ledger), however many parts
    there are; a token count from a tensor (as a mask sum would be) stays on the device until then."""
    ranks, _, _ = two_ranks
    for results in ranks:
        plain, monitored = results["ddp_plain"]["collectives"], results["ddp_accumulate"]["collectives"]
        steps = results["ddp_accumulate"]["state"]["tokens"]["optimizer_steps"]
        assert steps == 4
        # one per step, plus the end-of-fit report asking rank zero for the log directory (one broadcast)
        assert monitored - plain == steps + 1, (monitored, plain)


@pytest.mark.slow
def test_warnings_are_printed_once_not_once_per_rank(two_ranks):
    _, sections, stderr = two_ranks
    monitored = {name: text for name, text in sections.items() if name != "ddp_plain"}
    assert stderr.count(UNDERTRAINED) == len(monitored)  # one per monitored run
    for name, text in monitored.items():
        assert text.count(UNDERTRAINED) == 1, name
        assert text.count("ScalingMonitor pre-flight") == 1, name
        assert text.count("ScalingMonitor (flops): no dense peak FLOP/s known") == 1, name
        assert text.count("lightning-scaling report") == (0 if name == "hf_ddp" else 1), name  # report=False
        ours = [
            line
            for line in text.splitlines()
            if any(
                p in line
                for p in ("FlopCounter:", "TokenBudget:", "GradientNoiseScale:", "DataRepetition:", "ScalingMonitor (")
            )
        ]
        assert len(ours) == len(set(ours)), f"{name}: repeated lines {ours}"
        assert "switched off after an error" not in text, name
    assert "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize("run", ["fsdp2", "fsdp2_lazy"])
def test_fsdp2_counts_full_shapes_and_gns_steps_aside_once(two_ranks, tmp_path, run):
    ranks, sections, _ = two_ranks
    full = count_parameters(GPTLightningModule(TINY))
    ddp = ranks[0]["ddp"]
    for results in ranks:
        sharded = results[run]
        assert sharded["local_params"] < full  # the module really is sharded ...
        assert sharded["params"] == full  # ... and the count is from full shapes
        assert sharded["metrics"]["scaling/params"] == full
        assert sharded["repetition"]["params"] == full
        assert sharded["metrics"]["scaling/tokens"] == 4 * 8 * 16
        assert sharded["metrics"]["scaling/flops"] == pytest.approx(ddp["metrics"]["scaling/flops"], rel=1e-6)
        assert sharded["metrics"]["scaling/epochs"] == pytest.approx(0.5)
        assert not sharded["gns_enabled"] and sharded["gns_mode"] == "off"
        assert not any(k.startswith("scaling/gns") for k in sharded["metrics"])
    assert sections[run].count(GNS_ASIDE) == 1


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=(
        "needs 2 CUDA GPUs: Lightning's FSDPStrategy (FSDP1) refuses the CPU (Trainer(strategy='fsdp', "
        "accelerator='cpu') raises 'The strategy `fsdp` requires a GPU accelerator') and torch FSDP1 itself raises "
        "'FSDP needs a non-CPU accelerator device'; fully-sharded training on CPU is covered by the FSDP2 tests"
    ),
)
def test_fsdp1_on_two_gpus(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    trainer = _trainer(tmp_path, [monitor], steps=4, accelerator="cuda", devices=2, strategy="fsdp")
    trainer.fit(GPTLightningModule(TINY, use_kernels=False), DataLoader(_data(), batch_size=4, shuffle=False))
    if trainer.global_rank == 0:
        assert monitor.tokens.params == count_parameters(GPTLightningModule(TINY, use_kernels=False))
        assert monitor.tokens.tokens == 4 * 8 * 16
        assert not monitor.noise_scale.enabled
