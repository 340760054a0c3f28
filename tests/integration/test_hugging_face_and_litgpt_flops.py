"""Measured FLOPs on the models users bring: Hugging Face ``transformers`` and litgpt.

Tiny configs built here, random init, nothing downloaded. Each model's training step (forward, loss, backward)
is measured with ``measure_training_flops`` and checked against an independent count: torch's plain
``FlopCounterMode`` for the matmuls (it counts CPU SDPA as 0) plus attention counted by hand from the q/k/v
shapes SDPA received, under the "half" convention. The same model must measure the same model FLOPs padded or
not, SDPA or eager, with attention dropout or without; the analytic count from its config must agree within 2%.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it: never download

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lightning_scaling.flops.counter import count_parameters, measure_training_flops
from lightning_scaling.flops.model_shape import find_model_shape

try:
    import transformers
except ImportError:  # the test extra installs it; without it the Hugging Face tests skip
    transformers = None
try:
    import litgpt
except ImportError:
    litgpt = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="Hugging Face transformers is not installed")
needs_litgpt = pytest.mark.skipif(litgpt is None, reason="litgpt is not installed")

BATCH, SEQ, VOCAB = 2, 48, 96
_MATMULS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class _SdpaShapes(TorchDispatchMode):
    """Records (B, Hq, Sq, Sk, Dq, Dv, is_causal) of every CPU SDPA forward call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _CPU_SDPA:
            q, k, v = args[:3]
            is_causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
            b, h, s_q, d_q = q.shape
            self.calls.append((b, h, s_q, k.shape[-2], d_q, v.shape[-1], bool(is_causal)))
        return func(*args, **kwargs)


def independent_count(step) -> tuple[int, list[tuple]]:
    """Training FLOPs of ``step`` without our counter: torch's matmul count + attention by hand ("half")."""
    with FlopCounterMode(display=False) as plain, _SdpaShapes() as shapes:
        step()
    counts = plain.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if str(op) in _MATMULS)
    assert sum(counts.values()) == matmuls  # CPU SDPA counted 0 by torch: nothing counted twice
    attention = 0
    for b, h, s_q, s_k, d_q, d_v, is_causal in shapes.calls:
        forward = 2 * b * h * s_q * s_k * (d_q + d_v) // (2 if is_causal else 1)  # Q·Kᵀ and P·V, causal half
        attention += 3 * forward  # backward = 2 x forward
    return matmuls + attention, shapes.calls


# --------------------------------------------------------------------------------------- Hugging Face
if transformers is not None:
    transformers.logging.set_verbosity_error()

_NO_DROPOUT = {"attention_dropout": 0.0}
_HF_CONFIGS = {
    # name: (config class, model class, config kwargs)
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    # Gemma: gated GELU MLP and head_dim (32) != hidden_size / heads (16)
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.25,
            use_parallel_residual=True,
            hidden_dropout=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            partial_rotary_factor=0.5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}
_POSITIONS = {"gpt2": "n_positions"}


def hf_model(name: str, attn_implementation: str = "sdpa", **overrides):
    config_class, model_class, kwargs = _HF_CONFIGS[name]
    kwargs = {
        **kwargs,
        "vocab_size": VOCAB,
        _POSITIONS.get(name, "max_position_embeddings"): 64,
        "attn_implementation": attn_implementation,
        **overrides,
    }
    if name != "gpt2":
        kwargs = {**_NO_DROPOUT, **kwargs}
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    return model.train()


def hf_batch(padding: str | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padding == "right":
        mask[1, SEQ - 11 :] = 0
    elif padding == "left":
        mask[1, :11] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "labels": labels}
    if padding is not None:
        batch["attention_mask"] = mask
    return batch


def hf_step(model, batch):
    return lambda: model(**batch).loss.backward()


_REFERENCES: dict[str, tuple] = {}


def hf_reference_for(name: str) -> tuple:
    """The model on the plain path (SDPA, no padding): (name, model, our count, the independent count, SDPA calls),
    computed once per model."""
    if name not in _REFERENCES:
        model = hf_model(name)
        measured = measure_training_flops(hf_step(model, hf_batch(None)))
        expected, calls = independent_count(hf_step(model, hf_batch(None)))
        _REFERENCES[name] = (name, model, measured, expected, calls)
    return _REFERENCES[name]


@pytest.fixture(params=sorted(_HF_CONFIGS))
def hf_reference(request):
    return hf_reference_for(request.param)


@needs_transformers
def test_hf_measured_equals_independent_count(hf_reference):
    _, model, measured, expected, calls = hf_reference
    assert len(calls) == model.config.num_hidden_layers  # one SDPA call per layer was seen
    assert measured.total == expected
    assert measured.attention == {"fused:causal": model.config.num_hidden_layers}
    # backward = 2 x forward, but for matmuls that need no gradient (rotary frequencies x positions)
    assert measured.backward == pytest.approx(2 * measured.forward, rel=1e-3)
    assert measured.hardware > measured.total  # the fused backward recomputes the scores


@needs_transformers
def test_hf_analytic_count_from_the_config_within_two_percent(hf_reference):
    name, model, measured, _, _ = hf_reference
    holder = torch.nn.Module()
    holder.model = model  # found as pl_module.model.config
    shape = find_model_shape(holder)
    assert shape is not None
    assert shape.gated_mlp == (name in ("llama", "mistral", "qwen2", "gemma"))
    analytic = BATCH * shape.training_flops_per_sequence("half", SEQ, "palm")
    assert measured.total == pytest.approx(analytic, rel=0.02)


@needs_transformers
def test_hf_parameters(hf_reference):
    _, model, _, _, _ = hf_reference
    assert count_parameters(model) == model.num_parameters()
    assert count_parameters(model, non_embedding=True) == model.num_parameters(exclude_embeddings=True)


@needs_transformers
@pytest.mark.parametrize("padding", ["right", "left"])
def test_hf_padding_does_not_change_model_flops(hf_reference, padding):
    _, model, reference, _, _ = hf_reference
    measured = measure_training_flops(hf_step(model, hf_batch(padding)))
    assert measured.total == pytest.approx(reference.total, rel=0.01)
    # the padded batch takes the explicit-mask path: recognised as causal, and hardware counts the full square
    assert set(measured.attention) <= {"fused:causal_mask", "fused:causal"}
    assert measured.hardware >= reference.hardware


@needs_transformers
@pytest.mark.parametrize("padding", [None, "left"])
def test_hf_eager_attention_equals_sdpa(hf_reference, padding):
    name, _, reference, _, _ = hf_reference
    eager = hf_model(name, attn_implementation="eager")
    measured = measure_training_flops(hf_step(eager, hf_batch(padding)))
    assert measured.total == pytest.approx(reference.total, rel=0.01)
    assert measured.attention == {"eager:causal_mask": eager.config.num_hidden_layers}


@needs_transformers
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", [None, "right"])
def test_gpt2_attention_dropout_does_not_change_model_flops(attn_implementation, padding):
    # GPT-2's default attention dropout (0.1) sends SDPA to torch's math path: matmul, softmax, dropout, matmul
    _, _, reference, _, _ = hf_reference_for("gpt2")
    model = hf_model("gpt2", attn_implementation=attn_implementation, attn_pdrop=0.1)
    measured = measure_training_flops(hf_step(model, hf_batch(padding)))
    assert measured.total == pytest.approx(reference.total, rel=0.01)
    assert measured.attention == {"eager:causal_mask": 2}


@needs_transformers
def test_full_convention_counts_every_path_alike():
    """Under "full" nothing is halved: SDPA causal, SDPA masked and eager all count the whole square."""
    sdpa, eager = hf_model("llama"), hf_model("llama", attn_implementation="eager")
    counts = [
        measure_training_flops(hf_step(m, hf_batch(p)), "full").total
        for m, p in ((sdpa, None), (sdpa, "right"), (eager, "left"))
    ]
    assert counts[0] == counts[1] == counts[2]
    assert counts[0] > measure_training_flops(hf_step(sdpa, hf_batch(None)), "half").total


# --------------------------------------------------------------------------------------------- litgpt
_LITGPT_CONFIGS = {
    # A Llama 3.2 shrunk: grouped-query attention, gated MLP (LLaMAMLP), padded vocabulary
    "llama-3.2-like": (
        "Llama-3.2-1B",
        dict(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_query_groups=2,
            head_size=16,
            intermediate_size=96,
            vocab_size=90,
            padded_vocab_size=VOCAB,
            block_size=64,
        ),
    ),
    # Pythia: GptNeoxMLP, biases, parallel residual, partial rotary
    "pythia-like": (
        "pythia-14m",
        dict(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_query_groups=4,
            head_size=16,
            intermediate_size=256,
            vocab_size=90,
            padded_vocab_size=VOCAB,
            block_size=64,
        ),
    ),
    # Phi-2: parallel residual with a shared norm, biases, a biased head
    "phi-like": (
        "phi-2",
        dict(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_query_groups=4,
            head_size=16,
            intermediate_size=256,
            vocab_size=90,
            padded_vocab_size=VOCAB,
            block_size=64,
        ),
    ),
}


def litgpt_step(model, ids):
    def step():
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)).backward()

    return step


@needs_litgpt
@pytest.mark.parametrize("name", sorted(_LITGPT_CONFIGS))
def test_litgpt_measured_analytic_and_parameters(name):
    base, overrides = _LITGPT_CONFIGS[name]
    config = litgpt.Config.from_name(base, **overrides)
    torch.manual_seed(0)
    model = litgpt.GPT(config)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))

    measured = measure_training_flops(litgpt_step(model, ids))
    expected, calls = independent_count(litgpt_step(model, ids))
    assert len(calls) == config.n_layer
    assert measured.total == expected
    assert measured.attention == {"fused:causal": config.n_layer}

    class Holder(torch.nn.Module):  # a LightningModule-like holder: the GPT is a child named as the user likes
        def __init__(self) -> None:
            super().__init__()
            self.gpt = model

    shape = find_model_shape(Holder())
    assert shape is not None
    assert shape.vocab_size == VOCAB  # padded_vocab_size: the size of the head's matmul
    assert shape.gated_mlp == (config.mlp_class_name == "LLaMAMLP")
    assert (shape.n_kv_head, shape.head_dim, shape.d_ff) == (
        config.n_query_groups,
        config.head_size,
        config.intermediate_size,
    )
    analytic = BATCH * shape.training_flops_per_sequence("half", SEQ, "palm")
    assert measured.total == pytest.approx(analytic, rel=0.02)

    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model, non_embedding=True) == count_parameters(model) - model.transformer.wte.weight.numel()
