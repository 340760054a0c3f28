"""A scaling ladder end to end, on the CPU in minutes: train tiny GPTs at a few compute budgets, fit a
scaling law to their final validation losses (approaches 2 and 3), and plan the next, bigger run with it.

    python examples/scaling_ladder.py            # 3 budgets x 6 sizes, about 4 minutes on 2 cores
    python examples/scaling_ladder.py --quick    # 2 budgets x 3 sizes, about a minute

Each run logs with Lightning's CSVLogger; the TokenBudget callback writes ``scaling/tokens`` and
``scaling/params``, which is all ``lightning-scaling fit`` needs:

    lightning-scaling fit OUT/logs --approach 3 --out OUT/fitted.json
    lightning-scaling plan --law-file OUT/fitted.json --flops 1e13

The losses here are bytes of Python source after seconds of training, so the fitted constants describe this
toy ladder only; the workflow is the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

SEQ_LEN = 64
BATCH = 32


def train_one(out: Path, budget: float, d_model: int, n_layer: int, max_bytes: int) -> None:
    """Train one model for C/(6N) tokens (C = 6ND, Kaplan 2020 Table 1) and validate at the end."""
    import lightning as L
    import torch
    from gpt import GPTConfig, GPTLightningModule, make_dataloaders
    from lightning.pytorch.loggers import CSVLogger

    from lightning_scaling.callbacks import TokenBudget

    torch.manual_seed(0)
    cfg = GPTConfig(seq_len=SEQ_LEN, n_layer=n_layer, n_head=max(1, d_model // 16), d_model=d_model, d_ff=2 * d_model)
    probe = GPTLightningModule(cfg)
    n_params = sum(p.numel() for p in probe.parameters())  # tied weights counted once
    tokens_per_step = BATCH * SEQ_LEN
    steps = max(20, int(budget / (6 * n_params) / tokens_per_step))
    model = GPTLightningModule(cfg, lr=3e-3, warmup_steps=max(5, steps // 10), use_kernels=False)
    train, val = make_dataloaders(SEQ_LEN, BATCH, max_bytes=max_bytes)
    name = f"C{budget:.1e}_d{d_model}_l{n_layer}"
    trainer = L.Trainer(
        max_steps=steps,
        logger=CSVLogger(out / "logs", name=name),
        callbacks=[TokenBudget()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=20,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        accelerator="cpu",
        devices=1,
        val_check_interval=None,
        check_val_every_n_epoch=None,
    )
    trainer.fit(model, train)
    trainer.validate(model, val, verbose=False)
    print(
        f"  {name}: {n_params:,} params, {steps * tokens_per_step:,} tokens, "
        f"val loss {float(trainer.callback_metrics['val/loss']):.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 budgets x 3 tiny sizes (about a minute)")
    parser.add_argument("--out", default="scaling_ladder_out", help="folder for logs and the fitted law")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.quick:
        budgets, sizes, n_layer, max_bytes = (8e9, 2.4e10), (8, 16, 32), 1, 1_000_000
    else:
        budgets, sizes, n_layer, max_bytes = (2e10, 6e10, 1.8e11), (8, 12, 16, 24, 32, 48), 2, 4_000_000
    out = Path(args.out)
    print(f"training {len(budgets) * len(sizes)} runs: budgets {', '.join(f'{c:.1e}' for c in budgets)} FLOPs")
    for c in budgets:
        for d_model in sizes:
            train_one(out, c, d_model, n_layer, max_bytes)

    from lightning_scaling.laws.fitting import fit_approach2, fit_approach3
    from lightning_scaling.laws.runs import read_csv_logger

    points = read_csv_logger(out / "logs", loss_column="val/loss")
    print(f"\nfitting {len(points)} runs")
    try:
        a2 = fit_approach2(points, budget_tolerance=0.3)
        print(f"approach 2: N_opt ∝ C^{a2.a:.3f}, D_opt ∝ C^{a2.b:.3f} ({len(a2.optima)} budgets)")
    except ValueError as err:
        print(f"approach 2: {err}")
    try:
        a3 = fit_approach3(points, name="scaling ladder")
    except ValueError as err:
        print(f"approach 3: {err}")
        return 0
    law = a3.law
    print(
        f"approach 3: L = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f}; "
        f"N_opt ∝ C^{a3.a:.3f}"
    )
    law_file = out / "fitted.json"
    law_file.write_text(json.dumps({**law.to_dict(), "fit": a3.to_dict()}, indent=2) + "\n")
    next_budget = 10 * max(budgets)
    plan = law.compute_optimal(next_budget)
    print(
        f"\nnext run at {next_budget:.1e} FLOPs: {float(plan.params):,.0f} params on {float(plan.tokens):,.0f} "
        f"tokens ({float(plan.tokens) / float(plan.params):.1f} tokens/param), predicted loss {float(plan.loss):.3f}"
    )
    print(f"law written to {law_file}; also: lightning-scaling plan --law-file {law_file} --flops {next_budget:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
