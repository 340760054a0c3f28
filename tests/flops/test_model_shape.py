"""lightning_scaling.flops.model_shape: a model's shape read from Hugging Face and litgpt configs (dicts or
config objects, nothing downloaded): grouped-query attention, gated MLPs, padded vocabularies, multimodal configs,
and mixtures of experts, which have no analytic count."""

import os

import pytest
import torch

from lightning_scaling.flops.formulas import transformer_flops
from lightning_scaling.flops.model_shape import find_model_shape, shape_from

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it: never download


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


VOCAB = 96


def test_hugging_face_llama_config_is_read_with_grouped_query_attention():
    llama = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 16,
        "intermediate_size": 128,
        "hidden_act": "silu",
    }
    shape = shape_from(llama)
    assert (shape.n_layer, shape.d_model, shape.n_head, shape.n_kv_head, shape.d_ff) == (2, 64, 8, 2, 128)
    assert shape.gated_mlp
    expected = transformer_flops(2, 64, 8, 16, 100, d_ff=128, gated_mlp=True, n_kv_head=2).total
    assert shape.training_flops_per_sequence() == expected
    with pytest.raises(ValueError, match="n_kv_head"):
        shape_from({**llama, "num_key_value_heads": 3})


# ---------------------------------------------------------------------------------- configs read right
_LLAMA_LIKE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "intermediate_size": 96,
}


@pytest.mark.parametrize(
    "config, gated",
    [
        ({**_LLAMA_LIKE, "hidden_act": "silu"}, True),
        ({**_LLAMA_LIKE, "hidden_act": "gelu"}, False),
        ({**_LLAMA_LIKE, "hidden_act": "gelu_pytorch_tanh", "model_type": "gemma"}, True),  # GeGLU
        ({**_LLAMA_LIKE, "hidden_act": "silu", "model_type": "gpt_neox"}, False),
        ({**_LLAMA_LIKE, "mlp_class_name": "LLaMAMLP"}, True),  # litgpt: no hidden_act at all
        ({**_LLAMA_LIKE, "mlp_class_name": "GemmaMLP", "gelu_approximate": "tanh"}, True),
        ({**_LLAMA_LIKE, "mlp_class_name": "GptNeoxMLP"}, False),
        ({**_LLAMA_LIKE, "mlp_class_name": "GptNeoxMLP", "gated_mlp": True}, True),  # explicit wins
    ],
    ids=["silu", "gelu", "gemma", "neox-silu", "LLaMAMLP", "GemmaMLP", "GptNeoxMLP", "explicit"],
)
def test_gated_mlp_is_read_from_the_architecture(config, gated):
    assert shape_from(config).gated_mlp is gated


def test_litgpt_padded_vocabulary_is_the_head_size():
    shape = shape_from({**_LLAMA_LIKE, "vocab_size": 90, "padded_vocab_size": VOCAB})
    assert shape.vocab_size == VOCAB


def test_a_gated_mlp_flag_that_is_not_a_bool_is_refused():
    with pytest.raises(ValueError, match="gated_mlp must be True or False"):
        shape_from({**_LLAMA_LIKE, "gated_mlp": "yes"})


@pytest.mark.parametrize(
    "experts", [{"num_local_experts": 8}, {"n_expert": 8, "mlp_class_name": "LLaMAMoE"}], ids=["hugging-face", "litgpt"]
)
def test_mixture_of_experts_has_no_analytic_count(experts):
    holder = torch.nn.Module()
    holder.config = {**_LLAMA_LIKE, **experts}
    assert find_model_shape(holder) is None  # found on the module: no analytic count, FLOPs still measured
    with pytest.raises(ValueError, match="mixture of experts"):
        find_model_shape(None, {**_LLAMA_LIKE, **experts})  # passed as model_shape=: say so


@needs_transformers
def test_a_multimodal_config_is_read_from_its_text_part():
    text = transformers.LlamaConfig(**_LLAMA_LIKE)
    config = transformers.LlavaConfig(text_config=text.to_dict())
    shape = shape_from(config)
    assert (shape.n_layer, shape.d_model, shape.n_kv_head, shape.gated_mlp) == (2, 64, 2, True)


@needs_litgpt
def test_litgpt_mixture_of_experts_config_has_no_analytic_count():
    config = litgpt.Config.from_name(
        "Mixtral-8x7B-v0.1",
        n_layer=1,
        n_embd=64,
        n_head=4,
        n_query_groups=2,
        head_size=16,
        intermediate_size=96,
        padded_vocab_size=VOCAB,
        block_size=64,
    )
    with pytest.raises(ValueError, match="n_expert=8"):
        shape_from(config)
