"""Find a transformer's shape on a LightningModule (for the analytic FLOP count).

Reads our own names, nanoGPT's, Meta's reference code's, Hugging Face ``transformers`` configs (Llama, Mistral,
Qwen2, Gemma, GPT-2, GPT-NeoX, Phi and the like; a multimodal config's text part) and litgpt's ``Config``
(``n_query_groups``, ``head_size``, ``intermediate_size``, ``mlp_class_name``, ``padded_vocab_size``).
Biases, parallel residual blocks and norms change no matmul, so they do not enter the shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Our field name -> the names configs use for it, first match wins (ours / nanoGPT / Meta / Hugging Face / litgpt).
_ALIASES: dict[str, tuple[str, ...]] = {
    "n_layer": ("n_layer", "n_layers", "num_layers", "num_hidden_layers"),
    "d_model": ("d_model", "n_embd", "hidden_size", "dim"),
    "n_head": ("n_head", "n_heads", "num_heads", "num_attention_heads"),
    # litgpt pads the embedding and head to padded_vocab_size: that is the size of the logit matmul
    "vocab_size": ("padded_vocab_size", "vocab_size"),
    "seq_len": ("seq_len", "block_size", "max_seq_len", "max_position_embeddings", "n_positions", "n_ctx"),
    "d_ff": ("d_ff", "ffn_dim", "intermediate_size", "n_inner", "hidden_dim"),
    "n_kv_head": ("n_kv_head", "n_kv_heads", "num_key_value_heads", "n_query_groups", "num_kv_heads"),
    "head_dim": ("head_dim", "head_size"),
}
# A gated MLP (SwiGLU, GeGLU: three d×f matrices) by litgpt MLP class, by Hugging Face model_type, else by name of
# the activation. Gemma's MLP is gated with a GELU, so the activation alone cannot tell.
_GATED_MLP_CLASSES = {"LLaMAMLP": True, "GemmaMLP": True, "GptNeoxMLP": False}
_GATED_MODEL_TYPES = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "cohere",
            "granite",
            "stablelm",
        ),
        True,
    ),
    **dict.fromkeys(
        (
            "gpt2",
            "gpt_neox",
            "gptj",
            "gpt_neo",
            "phi",
            "opt",
            "bloom",
            "falcon",
            "gpt_bigcode",
            "starcoder2",
            "codegen",
        ),
        False,
    ),
}
_GATED_ACTIVATIONS = {"silu", "swiglu", "swish", "geglu"}
# Mixture-of-experts configs: the analytic dense count does not apply (experts per token, router).
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "n_expert", "moe_num_experts")


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape; ``seq_len`` is the number of tokens the model sees per sequence."""

    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    seq_len: int
    d_ff: int | None = None
    gated_mlp: bool = False
    n_kv_head: int | None = None  # grouped-query attention: key/value heads (default: n_head)
    head_dim: int | None = None  # default: d_model / n_head

    def __post_init__(self) -> None:
        from lightning_scaling.argument_checks import positive_int

        for name in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len"):
            positive_int(f"model_shape.{name}", getattr(self, name))
        for name in ("d_ff", "n_kv_head", "head_dim"):
            if getattr(self, name) is not None:
                positive_int(f"model_shape.{name}", getattr(self, name))
        if not isinstance(self.gated_mlp, bool):
            raise ValueError(f"model_shape.gated_mlp must be True or False, got {self.gated_mlp!r}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(
                "model_shape.n_head must be a multiple of model_shape.n_kv_head, "
                f"got {self.n_head} and {self.n_kv_head}"
            )
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(
                f"model_shape.d_model must be divisible by model_shape.n_head, got {self.d_model} and {self.n_head}"
            )

    def training_flops_per_sequence(
        self, causal_attention: str = "half", seq_len: int | None = None, convention: str = "chinchilla"
    ) -> float:
        """Training FLOPs (forward + backward) of one sequence of ``seq_len`` tokens (default: ``self.seq_len``).

        ``convention="chinchilla"`` is Hoffmann et al. 2022 App. F (embeddings and softmax included);
        ``"palm"`` (Chowdhery et al. 2022 App. B) counts matmuls only, which is what a FLOP counter measures.
        """
        from lightning_scaling.flops.formulas import transformer_flops

        return transformer_flops(
            n_layer=self.n_layer,
            d_model=self.d_model,
            n_head=self.n_head,
            seq_len=seq_len or self.seq_len,
            vocab_size=self.vocab_size,
            d_ff=self.d_ff,
            gated_mlp=self.gated_mlp,
            causal=True,
            convention=convention,
            causal_attention=causal_attention,
            n_kv_head=self.n_kv_head,
            head_dim=self.head_dim,
        ).total


def _get(source: Any, name: str) -> Any:
    if isinstance(source, Mapping):
        return source.get(name)
    try:
        return getattr(source, name, None)
    except Exception:  # noqa: BLE001 - a config property that raises is a missing field
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _gated(source: Any) -> bool:
    """Whether the MLP has three d×f matrices: an explicit ``gated_mlp``, litgpt's ``mlp_class_name``, a Hugging
    Face ``model_type`` we know, else a gated activation name (silu/swish/swiglu/geglu)."""
    explicit = _get(source, "gated_mlp")
    if explicit is not None:
        if not isinstance(explicit, bool):
            raise ValueError(f"model_shape.gated_mlp must be True or False, got {explicit!r}")
        return explicit
    mlp_class = _get(source, "mlp_class_name")
    if isinstance(mlp_class, str) and mlp_class in _GATED_MLP_CLASSES:
        return _GATED_MLP_CLASSES[mlp_class]
    model_type = _get(source, "model_type")
    if isinstance(model_type, str) and model_type in _GATED_MODEL_TYPES:
        return _GATED_MODEL_TYPES[model_type]
    for name in ("hidden_act", "hidden_activation", "activation", "activation_function"):
        act = _get(source, name)
        if isinstance(act, str):
            return act.lower() in _GATED_ACTIVATIONS
    return False


def shape_from(source: Any) -> ModelShape | None:
    """A ``ModelShape`` from a config-like object or mapping, or None when a required field is missing.

    Raises ``ValueError`` for a shape that is impossible or a mixture-of-experts config (no dense analytic count).
    """
    if source is None:
        return None
    if isinstance(source, ModelShape):
        return source
    if not isinstance(source, Mapping):  # Hugging Face: a multimodal config's language model
        get_text_config, text_config = _get(source, "get_text_config"), _get(source, "text_config")
        if callable(get_text_config):
            with contextlib.suppress(Exception):  # not a Hugging Face config after all: read it as it is
                source = get_text_config()
        elif text_config is not None and not isinstance(text_config, Mapping):  # transformers < 4.45
            source = text_config
    values: dict[str, Any] = {}
    for field, names in _ALIASES.items():
        for name in names:
            value = _get(source, name)
            if _is_int(value):
                values[field] = value
                break
    if not all(k in values for k in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len")):
        return None
    for name in _EXPERT_COUNTS:
        experts = _get(source, name)
        if _is_int(experts) and experts > 1:
            raise ValueError(
                f"the model config is a mixture of experts ({name}={experts}): the analytic FLOP count covers dense "
                "transformers only; leave model_shape unset (FLOPs are still measured)"
            )
    return ModelShape(gated_mlp=_gated(source), **values)


def find_model_shape(pl_module: Any, explicit: Any = None) -> ModelShape | None:
    """The shape passed in, else one found on ``pl_module.config``, ``pl_module.model.config``, the ``config`` of
    any direct child module (``self.gpt = GPT(config)``), ``hparams.config`` or ``hparams``."""
    if explicit is not None:
        shape = shape_from(explicit)
        if shape is None:
            raise ValueError(
                "model_shape must give n_layer, d_model, n_head, vocab_size and seq_len "
                f"(or their Hugging Face or litgpt names), got {explicit!r}"
            )
        return shape
    candidates = [getattr(pl_module, "config", None), getattr(getattr(pl_module, "model", None), "config", None)]
    children = getattr(pl_module, "children", None)
    if callable(children):
        candidates += [getattr(child, "config", None) for child in children()]
    candidates += [_get(getattr(pl_module, "hparams", {}), "config"), getattr(pl_module, "hparams", None)]
    for candidate in candidates:
        try:
            shape = shape_from(candidate)
        except ValueError:  # a config that is not a dense transformer's: no analytic count
            continue
        if shape is not None:
            return shape
    return None
