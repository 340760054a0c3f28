"""Models users did not write, trained with ScalingMonitor(): a Hugging Face Llama and a litgpt GPT (tiny configs,
random init, nothing downloaded). Parameters, tokens and FLOPs are checked against independent counts, and the
FLOP total holds under torch.compile, activation checkpointing, bf16-mixed and gradient accumulation."""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch
from helpers import quick_trainer
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import ScalingMonitor
from lightning_scaling.callbacks._common import RULE_ATTENTION_MASK, RULE_LABELS
from lightning_scaling.flops.counter import count_parameters, measure_training_flops

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (it is in the test extra)")

VOCAB, SEQ = 128, 24


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


class HFModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _padded_batches(n: int = 16, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    """Pre-collated batches, right-padded with an attention mask; lengths vary so shapes vary too."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        longest = (12, 16, 20, SEQ)[i % 4]
        ids = torch.randint(1, VOCAB, (batch, longest), generator=g)
        mask = torch.ones_like(ids)
        for r in range(1, batch):
            mask[r, int(torch.randint(4, longest + 1, (1,), generator=g)) :] = 0
        out.append(
            {"input_ids": ids * mask, "attention_mask": mask, "labels": (ids * mask).masked_fill(mask == 0, -100)}
        )
    return out


def _fit(module, batches, tmp_path, steps, **kwargs):
    monitor = ScalingMonitor(report=False, noise_scale={"warmup_steps": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quick_trainer(tmp_path, [monitor], steps=steps, **kwargs)
        trainer.fit(module, DataLoader(batches, batch_size=None))
    return monitor


def _independent_flops(batches) -> int:
    """Every batch counted on its own with the plain counter (FLOPs do not depend on the weights)."""
    model = _llama()
    return sum(measure_training_flops(lambda b=b: model(**b).loss.backward()).total for b in batches)


def test_hugging_face_llama_parameters_tokens_and_flops(tmp_path):
    batches = _padded_batches()
    module = HFModule(_llama())
    monitor = _fit(module, batches, tmp_path, steps=8, accumulate_grad_batches=2)
    assert monitor.tokens.params == count_parameters(module) == sum(p.numel() for p in module.parameters())
    assert monitor.tokens.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert monitor.tokens.token_rule == RULE_ATTENTION_MASK
    assert monitor.tokens.supervised_tokens == sum(int((b["labels"] != -100).sum()) for b in batches)
    assert monitor.flops.total_flops == pytest.approx(_independent_flops(batches), rel=1e-9)
    # four lengths: the first measured shape's attention split gives the formula, the second checks it, the other
    # two are predicted (exactly: rel 1e-9 above)
    assert monitor.flops.measured_shapes == 2 and monitor.flops.predicted_shapes == 2
    assert monitor.noise_scale.estimator.count == 8


@pytest.mark.parametrize("variant", ["compile", "checkpointing", "bf16", "no_accumulation"])
def test_hugging_face_llama_flops_hold_under(variant, tmp_path):
    batches = _padded_batches(8)
    reference = _fit(HFModule(_llama()), batches, tmp_path / "ref", steps=4, accumulate_grad_batches=2)
    model = _llama()
    kwargs: dict = {"accumulate_grad_batches": 2}
    if variant == "compile":
        model = torch.compile(model, backend="eager")
    elif variant == "checkpointing":
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    elif variant == "bf16":
        kwargs["precision"] = "bf16-mixed"
    else:
        kwargs = {}
    monitor = _fit(
        HFModule(model), batches, tmp_path / variant, steps=8 if variant == "no_accumulation" else 4, **kwargs
    )
    assert monitor.tokens.tokens == reference.tokens.tokens
    # Under activation checkpointing model FLOPs are forward + min(backward, 2 x forward): exact when the real
    # backward is twice the forward, a little high when it skips a matmul (an input nothing needs a gradient
    # for; 3e-5 of the total with transformers 5.3).
    tolerance = 1e-3 if variant == "checkpointing" else 1e-9
    assert monitor.flops.total_flops == pytest.approx(reference.flops.total_flops, rel=tolerance)
    if variant == "checkpointing":  # the recomputed forward is hardware FLOPs only
        assert monitor.flops.total_hardware_flops > reference.flops.total_hardware_flops


class LitGPTModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from litgpt import GPT, Config

        torch.manual_seed(0)
        self.config = Config(
            block_size=64,
            vocab_size=VOCAB,
            padded_vocab_size=VOCAB,
            n_layer=2,
            n_head=4,
            n_query_groups=2,
            n_embd=32,
            intermediate_size=64,
            mlp_class_name="LLaMAMLP",
            norm_class_name="RMSNorm",
            bias=False,
            parallel_residual=False,
            rotary_percentage=1.0,
        )
        self.model = GPT(self.config)

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_litgpt_fine_tuning_batches_count_real_tokens(tmp_path):
    pytest.importorskip("litgpt", reason="litgpt is not installed (it is in the test extra)")
    # litgpt's SFT collate: input_ids padded with 0, labels -100 at the padding and the prompt, no attention mask
    g = torch.Generator().manual_seed(1)
    batches, real = [], 0
    for _ in range(6):
        lengths = torch.randint(6, SEQ + 1, (4,), generator=g).tolist()
        ids = torch.zeros(4, max(lengths), dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for r, n in enumerate(lengths):
            ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=g)
            labels[r, 3:n] = ids[r, 3:n]  # a 3-token prompt is masked too
        batches.append({"input_ids": ids, "labels": labels})
        real += sum(lengths)
    module = LitGPTModule()
    monitor = _fit(module, batches, tmp_path, steps=6)
    assert monitor.tokens.params == sum(p.numel() for p in module.parameters())
    assert monitor.tokens.tokens == real  # not the padded count
    assert monitor.tokens.token_rule == RULE_LABELS
    assert monitor.flops.total_flops > 0 and monitor.flops.enabled
