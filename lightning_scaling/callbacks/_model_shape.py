"""Find a transformer's shape on a LightningModule (for the analytic FLOP count)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# Our field name -> the names configs use for it (ours / nanoGPT / Hugging Face).
_ALIASES: dict[str, tuple[str, ...]] = {
    "n_layer": ("n_layer", "n_layers", "num_layers", "num_hidden_layers"),
    "d_model": ("d_model", "n_embd", "hidden_size", "dim"),
    "n_head": ("n_head", "n_heads", "num_heads", "num_attention_heads"),
    "vocab_size": ("vocab_size",),
    "seq_len": ("seq_len", "block_size", "max_seq_len", "max_position_embeddings", "n_ctx"),
    "d_ff": ("d_ff", "ffn_dim", "intermediate_size", "n_inner", "hidden_dim"),
    "n_kv_head": ("n_kv_head", "n_kv_heads", "num_key_value_heads", "n_query_groups", "num_kv_heads"),
    "head_dim": ("head_dim", "head_size"),
}
_GATED_ACTIVATIONS = {"silu", "swiglu", "swish", "geglu"}


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
        from lightning_scaling._validation import positive_int

        for name in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len"):
            positive_int(f"model_shape.{name}", getattr(self, name))
        for name in ("d_ff", "n_kv_head", "head_dim"):
            if getattr(self, name) is not None:
                positive_int(f"model_shape.{name}", getattr(self, name))
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(
                f"model_shape.n_head must be a multiple of model_shape.n_kv_head, got {self.n_head} and {self.n_kv_head}"
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
        from lightning_scaling.flops import transformer_flops

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
    return getattr(source, name, None)


def shape_from(source: Any) -> ModelShape | None:
    """A ``ModelShape`` from a config-like object or mapping, or None when a required field is missing."""
    if source is None:
        return None
    if isinstance(source, ModelShape):
        return source
    values: dict[str, Any] = {}
    for field, names in _ALIASES.items():
        for name in names:
            value = _get(source, name)
            if isinstance(value, int) and not isinstance(value, bool):
                values[field] = value
                break
    if not all(k in values for k in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len")):
        return None
    gated = _get(source, "gated_mlp")
    if gated is None:
        act = _get(source, "hidden_act") or _get(source, "activation")
        gated = isinstance(act, str) and act.lower() in _GATED_ACTIVATIONS
    return ModelShape(gated_mlp=bool(gated), **values)


def find_model_shape(pl_module: Any, explicit: Any = None) -> ModelShape | None:
    """The shape passed in, else one found on ``pl_module.config``, ``pl_module.model.config`` or ``hparams``."""
    if explicit is not None:
        shape = shape_from(explicit)
        if shape is None:
            raise ValueError(
                "model_shape must give n_layer, d_model, n_head, vocab_size and seq_len "
                f"(or their Hugging Face names), got {explicit!r}"
            )
        return shape
    candidates = [
        getattr(pl_module, "config", None),
        getattr(getattr(pl_module, "model", None), "config", None),
        _get(getattr(pl_module, "hparams", {}), "config"),
        getattr(pl_module, "hparams", None),
    ]
    for candidate in candidates:
        try:
            shape = shape_from(candidate)
        except ValueError:  # a config that is not a transformer's: no analytic count
            continue
        if shape is not None:
            return shape
    return None
