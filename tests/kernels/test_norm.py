"""Fused LayerNorm/RMSNorm with per-example squared gradient norms: the Triton kernels (in Triton's CPU interpreter
here) and the CPU reference path against float64 references written here (per-example gradients by torch.func),
every way the backward splits examples over programs, the modules against torch.nn.LayerNorm/RMSNorm, autograd
plumbing (activation checkpointing, torch.compile, copies), fake tensors, saved tensors and FLOP counting."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from kernel_checks import (
    assert_equal_in_float64,
    assert_within_twice_torch_error,
    needs_interpreter,
    saved_activation_bytes,
)
from torch import nn
from torch.func import grad, vmap
from torch.utils.flop_counter import FlopCounterMode

from lightning_scaling.kernels import triton_on_cpu
from lightning_scaling.kernels.modules import FusedLayerNorm, FusedRMSNorm
from lightning_scaling.kernels.ops import norm as norm_ops
from lightning_scaling.kernels.ops.norm import MAX_WIDTH, fused_layer_norm, fused_rms_norm

EPS = 1e-5
KINDS = ["layer_norm_bias", "layer_norm", "rms_norm"]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3}
SQ_NORM_RTOL = {torch.float32: 1e-5, torch.float16: 1e-4}


# ------------------------------------------------------------------------------------------ references


def reference_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rms: bool) -> torch.Tensor:
    """The textbook formulas, in whatever dtype they are given."""
    if rms:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight
    centred = x - x.mean(-1, keepdim=True)
    y = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + EPS) * weight
    return y if bias is None else y + bias


def reference_per_example_sq_norms(x, weight, bias, grad_out, rms: bool) -> torch.Tensor:
    """|dL_b/dw|² + |dL_b/db|² for each example b = x[b], L_b = <norm(x[b]), grad_out[b]>, in float64."""
    params = {"weight": weight.double()} if bias is None else {"weight": weight.double(), "bias": bias.double()}

    def example_loss(p, x_b, dy_b):
        return (reference_norm(x_b, p["weight"], p.get("bias"), rms) * dy_b).sum()

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x.double(), grad_out.double())
    return sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())


def reference_backward(x, weight, bias, grad_out, rms: bool, examples: int) -> list[torch.Tensor | None]:
    """[dx, dw, db, per-example squared norms] of the textbook formulas in float64, for x of [rows, H] made of
    ``examples`` equal runs of rows (db None without a bias)."""
    exact = [t.double().requires_grad_() for t in (x, weight)] + (
        [bias.double().requires_grad_()] if bias is not None else []
    )
    reference_norm(exact[0], exact[1], exact[2] if bias is not None else None, rms).backward(grad_out.double())
    split = (examples, x.shape[0] // examples, x.shape[1])
    sq_norms = reference_per_example_sq_norms(x.reshape(split), weight, bias, grad_out.reshape(split), rms)
    return [exact[0].grad, exact[1].grad, exact[2].grad if bias is not None else None, sq_norms]


def assert_close_to_reference(got, expected) -> None:
    """The op's (dx, dw, db, squared norms) against ``reference_backward``'s, in float64."""
    for name, mine, ref in zip(("dx", "dw", "db", "squared norms"), got, expected, strict=True):
        if ref is None:
            assert mine.numel() == 0, name
            continue
        torch.testing.assert_close(mine.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


def make_inputs(shape, kind: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]
    x = 2 * torch.randn(shape, generator=gen) + 0.5
    weight = 1 + 0.5 * torch.randn(width, generator=gen)
    bias = 0.3 * torch.randn(width, generator=gen) if kind == "layer_norm_bias" else None
    grad_out = torch.randn(shape, generator=gen)
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(weight), cast(bias), grad_out.to(dtype)


def fused(kind: str, sink: torch.Tensor | None = None):
    if kind == "rms_norm":
        return lambda x, w, b=None: fused_rms_norm(x, w, EPS, per_example_sink=sink)
    return lambda x, w, b=None: fused_layer_norm(x, w, b, EPS, per_example_sink=sink)


def check_against_references(shape, kind: str, dtype: torch.dtype) -> None:
    """Output and input gradients within twice PyTorch's own error in ``dtype`` (plus a floor) of float64; the
    per-example squared norms within a relative tolerance of the float64 torch.func ones."""
    rms = kind == "rms_norm"
    x, weight, bias, grad_out = make_inputs(shape, kind, dtype)
    tensors = [x, weight] + ([bias] if bias is not None else [])
    assert_within_twice_torch_error(
        fused(kind), lambda x, w, b=None: reference_norm(x, w, b, rms), tensors, grad_out, FLOOR[dtype]
    )
    examples = shape[0] if len(shape) > 1 else 1
    sink = torch.zeros(examples, requires_grad=True)
    fused(kind, sink)(*[t.detach().requires_grad_() for t in tensors]).backward(grad_out)
    expected = reference_per_example_sq_norms(
        x if len(shape) > 1 else x[None], weight, bias, grad_out if len(shape) > 1 else grad_out[None], rms
    )
    assert sink.grad.dtype == torch.float32 and sink.grad.shape == (examples,)
    torch.testing.assert_close(sink.grad.double(), expected, rtol=SQ_NORM_RTOL[dtype], atol=0)


# ------------------------------------------------------------------------------------------ the kernels


# (2, 8, 37): each example cut into 2 chunks; (6, 1, 20): one row per example, 2 examples per program;
# (1, 7, 33): one example in 4 chunks, the last one empty; (5, 19): rows are examples; (3, 2, 3, 24): two
# leading dims after the examples'; (4,): one example of one row. Odd widths: the column tail of the tile.
SHAPES = [(2, 8, 37), (6, 1, 20), (1, 7, 33), (5, 19), (3, 2, 3, 24), (40,)]


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernels_match_float64_reference(kind, shape):
    with triton_on_cpu():
        check_against_references(shape, kind, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernels_half_precision(kind):
    with triton_on_cpu():
        check_against_references((2, 8, 37), kind, torch.float16)


@needs_interpreter
@pytest.mark.parametrize("target_programs", [1, 2, 3, 6, 12])
def test_every_split_of_examples_over_programs_gives_the_same_gradients(target_programs):
    # 3 examples of 5 rows: all three in one program (1), two per program (2), one per program (3), each cut
    # into 2 chunks of 3 rows (6), into 4 chunks of 2 rows, the last one empty (12).
    x, weight, bias, grad_out = make_inputs((3, 5, 40), "layer_norm_bias")
    x2, dy2 = x.reshape(15, 40), grad_out.reshape(15, 40)
    with triton_on_cpu():
        _, mean, rstd = norm_ops._triton_forward(x2, weight, bias, EPS, False)
        got = norm_ops._triton_backward(dy2, x2, weight, mean, rstd, True, False, 3, target_programs=target_programs)
    assert_close_to_reference(got, reference_backward(x2, weight, bias, dy2, rms=False, examples=3))


@pytest.mark.parametrize(
    "examples,rows,target,expected",
    [
        (3, 5, 1, (3, 1, 5)),
        (3, 5, 2, (2, 1, 5)),
        (3, 5, 6, (1, 2, 3)),
        (3, 5, 12, (1, 4, 2)),
        (1, 4096, 528, (1, 256, 16)),
        (64, 2048, 528, (1, 8, 256)),
        (16384, 1, 528, (32, 1, 1)),
        (600, 8, 528, (2, 1, 8)),
    ],
)
def test_partition_of_the_backward(examples, rows, target, expected):
    # (examples per program, chunks per example, rows per chunk): about `target` programs, never a chunk per row.
    assert norm_ops._partition(examples, rows, target) == expected


@needs_interpreter
def test_an_example_cut_into_the_most_chunks():
    # One example of 300 rows and room for 1024 programs: 256 chunks of 2 rows (106 of them empty); stage 2 then
    # sums each example's chunks in its widest reshape.
    assert norm_ops._partition(1, 300, 1024) == (1, norm_ops._MAX_CHUNKS, 2)
    x, weight, _, grad_out = make_inputs((300, 24), "rms_norm")
    with triton_on_cpu():
        _, mean, rstd = norm_ops._triton_forward(x, weight, None, EPS, True)
        got = norm_ops._triton_backward(grad_out, x, weight, mean, rstd, False, True, 1, target_programs=1024)
    assert_close_to_reference(got, reference_backward(x, weight, None, grad_out, rms=True, examples=1))


@needs_interpreter
def test_triton_kernels_take_non_contiguous_inputs_and_fp32_weights_with_fp16_x():
    x, weight, bias, grad_out = make_inputs((4, 6, 24), "layer_norm_bias")
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    with triton_on_cpu():
        y = fused_layer_norm(xt, weight, bias, EPS)
    torch.testing.assert_close(y, reference_norm(x, weight, bias, False))
    # Mixed precision as under autocast: fp16 activations, fp32 parameters; y and dx in fp16, dw and db in fp32.
    x_half = x.half().requires_grad_()
    w32, b32 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    sink = torch.zeros(4, requires_grad=True)
    with triton_on_cpu():
        y_half = fused_layer_norm(x_half, w32, b32, EPS, sink)
        y_half.backward(grad_out.half())
    exact = [t.double().requires_grad_() for t in (x_half.detach(), weight, bias)]
    reference_norm(*exact, rms=False).backward(grad_out.half().double())
    assert (y_half.dtype, x_half.grad.dtype, w32.grad.dtype, b32.grad.dtype) == (
        torch.float16,
        torch.float16,
        torch.float32,
        torch.float32,
    )
    torch.testing.assert_close(x_half.grad.double(), exact[0].grad, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(w32.grad.double(), exact[1].grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b32.grad.double(), exact[2].grad, atol=1e-4, rtol=1e-5)
    expected = reference_per_example_sq_norms(x_half.detach(), weight, bias, grad_out.half(), False)
    torch.testing.assert_close(sink.grad.double(), expected, rtol=1e-5, atol=0)


@needs_interpreter
def test_triton_path_refuses_rows_wider_than_its_tile():
    with triton_on_cpu(), pytest.raises(ValueError, match=f"at most {MAX_WIDTH}"):
        fused_rms_norm(torch.ones(1, MAX_WIDTH + 1), torch.ones(MAX_WIDTH + 1))


# ------------------------------------------------------------------------------------------ the CPU path


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_path_matches_float64_reference(kind):
    check_against_references((3, 7, 33), kind, torch.float32)


def test_cpu_path_in_float64_is_the_formula_and_passes_gradcheck():
    # gradcheck alone compares the op's PyTorch backward with its own forward; the formulas written here check both
    x, weight, bias, grad_out = make_inputs((2, 3, 6), "layer_norm_bias", torch.float64)
    fused_ln = lambda x, w, b: fused_layer_norm(x, w, b, eps=EPS)
    fused_rms = lambda x, w: fused_rms_norm(x, w, EPS)
    assert_equal_in_float64(fused_ln, lambda x, w, b: reference_norm(x, w, b, rms=False), [x, weight, bias], grad_out)
    assert_equal_in_float64(fused_rms, lambda x, w: reference_norm(x, w, None, rms=True), [x, weight], grad_out)
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(lambda *t: fused_layer_norm(*t, eps=EPS), inputs)
    assert torch.autograd.gradcheck(lambda x, w: fused_rms_norm(x, w, EPS), inputs[:2])


def test_one_sink_shared_by_two_layers_collects_their_sum():
    x, weight, bias, grad_out = make_inputs((3, 4, 16), "layer_norm_bias")
    alone = []
    for layer in ("layer", "rms"):
        sink = torch.zeros(3, requires_grad=True)
        y = (
            fused_layer_norm(x, weight.requires_grad_(), bias, EPS, sink)
            if layer == "layer"
            else fused_rms_norm(x, weight, EPS, sink)
        )
        y.backward(grad_out)
        alone.append(sink.grad)
    # each layer alone against the formulas written here (the bias is a parameter of the layer: it counts too)
    for got, layer_bias, rms in ((alone[0], bias, False), (alone[1], None, True)):
        expected = reference_per_example_sq_norms(x, weight, layer_bias, grad_out, rms)
        torch.testing.assert_close(got.double(), expected, rtol=SQ_NORM_RTOL[torch.float32], atol=0)
    shared = torch.zeros(3, requires_grad=True)
    (fused_layer_norm(x, weight, bias, EPS, shared) + fused_rms_norm(x, weight, EPS, shared)).backward(grad_out)
    torch.testing.assert_close(shared.grad, alone[0] + alone[1])


# ------------------------------------------------------------------------------------------ the modules


def per_example_sq_norms_by_loop(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Each example alone through ``module``, its parameter gradients squared and summed."""
    norms = []
    for b in range(x.shape[0]):
        grads = torch.autograd.grad((module(x[b : b + 1]) * grad_out[b : b + 1]).sum(), list(module.parameters()))
        norms.append(sum(g.double().square().sum() for g in grads))
    return torch.stack(norms)


def torch_and_fused(kind: str, width: int, eps: float | None = EPS):
    torch.manual_seed(0)
    if kind == "rms_norm":
        reference, ours = nn.RMSNorm(width, eps=eps), FusedRMSNorm(width, eps=eps)
    else:
        reference = nn.LayerNorm(width, eps=eps, bias=kind == "layer_norm_bias")
        ours = FusedLayerNorm(width, eps=eps, bias=kind == "layer_norm_bias")
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p))
    ours.load_state_dict(reference.state_dict())  # same keys: checkpoints interchange
    assert ours.state_dict().keys() == reference.state_dict().keys()
    return reference, ours


@pytest.mark.parametrize(
    "kind,eps", [("layer_norm_bias", 1e-5), ("layer_norm", 1e-5), ("rms_norm", None), ("rms_norm", 1e-6)]
)
def test_module_matches_torch_norm_with_the_same_weights(kind, eps):
    reference, ours = torch_and_fused(kind, 24, eps)
    x, _, _, grad_out = make_inputs((3, 5, 24), kind)
    assert ours.per_example_sq_norms is None
    for module in (reference, ours):
        module(x).backward(grad_out)
    for (name, p_ours), p_ref in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, msg=name)
    torch.testing.assert_close(ours(x), reference(x))
    expected = per_example_sq_norms_by_loop(reference, x, grad_out)
    torch.testing.assert_close(ours.per_example_sq_norms.double(), expected, rtol=1e-5, atol=0)


@needs_interpreter
@pytest.mark.parametrize("kind", ["layer_norm_bias", "rms_norm"])
def test_module_on_triton_kernels_records_the_per_example_norms(kind):
    reference, ours = torch_and_fused(kind, 20)
    x, _, _, grad_out = make_inputs((2, 6, 20), kind)
    with triton_on_cpu():
        ours(x).backward(grad_out)
    expected = per_example_sq_norms_by_loop(reference, x, grad_out)
    torch.testing.assert_close(ours.per_example_sq_norms.double(), expected, rtol=1e-5, atol=0)


def test_norms_are_those_of_the_gradient_as_it_flows():
    # A mean over the batch gives each example's gradient piece a 1/B: the squared norms carry 1/B².
    reference, ours = torch_and_fused("layer_norm_bias", 16)
    x, _, _, grad_out = make_inputs((4, 3, 16), "layer_norm_bias")
    (ours(x) * grad_out).sum().backward()
    summed = ours.per_example_sq_norms
    expected = per_example_sq_norms_by_loop(reference, x, grad_out)
    torch.testing.assert_close(summed.double(), expected, rtol=1e-5, atol=0)
    (ours(x) * grad_out).sum(dim=(1, 2)).mean().backward()
    torch.testing.assert_close(ours.per_example_sq_norms, summed / 16)


def test_module_records_only_when_there_is_a_parameter_gradient():
    x, _, _, grad_out = make_inputs((2, 3, 8), "layer_norm_bias")
    off = FusedLayerNorm(8, record_per_example_norms=False)
    off(x).backward(grad_out)
    assert off.per_example_sq_norms is None and off.weight.grad is not None
    frozen = FusedRMSNorm(8).requires_grad_(False)
    frozen(x.requires_grad_()).backward(grad_out)
    assert frozen.per_example_sq_norms is None and x.grad is not None
    plain = FusedLayerNorm(8, elementwise_affine=False)
    torch.testing.assert_close(plain(x), nn.LayerNorm(8, elementwise_affine=False)(x))
    assert list(plain.parameters()) == []
    on = FusedLayerNorm(8)
    with torch.no_grad():
        on(x)
    assert on.per_example_sq_norms is None


def test_module_under_activation_checkpointing_records_the_same_norms():
    from torch.utils.checkpoint import checkpoint

    reference, ours = torch_and_fused("layer_norm_bias", 16)
    x, _, _, grad_out = make_inputs((3, 4, 16), "layer_norm_bias")
    ours(x).backward(grad_out)
    plain = ours.per_example_sq_norms
    expected = per_example_sq_norms_by_loop(reference, x, grad_out)
    torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=0)
    for reentrant in (False, True):
        ours.per_example_sq_norms = None
        checkpoint(ours, x.detach().requires_grad_(), use_reentrant=reentrant).backward(grad_out)
        torch.testing.assert_close(ours.per_example_sq_norms, plain, msg=f"use_reentrant={reentrant}")


def test_copies_and_pickles_of_the_module_record_their_own_norms():
    reference, ours = torch_and_fused("rms_norm", 16)
    x, _, _, grad_out = make_inputs((3, 4, 16), "rms_norm")
    ours(x).backward(grad_out)
    expected = ours.per_example_sq_norms
    torch.testing.assert_close(
        expected.double(), per_example_sq_norms_by_loop(reference, x, grad_out), rtol=1e-5, atol=0
    )
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        clone.per_example_sq_norms = None
        clone(x).backward(grad_out)
        torch.testing.assert_close(clone.per_example_sq_norms, expected)
    ours(x[:2]).backward(grad_out[:2])  # a smaller last batch
    assert ours.per_example_sq_norms.shape == (2,)


def test_module_compiles_into_one_graph_that_records():
    torch._dynamo.reset()

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm_in, self.linear, self.norm_out = FusedLayerNorm(16), nn.Linear(16, 16), FusedRMSNorm(16)

        def forward(self, x):
            return self.norm_out(self.linear(self.norm_in(x)))

    torch.manual_seed(0)
    block = Block()
    x, _, _, grad_out = make_inputs((3, 4, 16), "rms_norm")
    block(x).backward(grad_out)  # the first call makes the sinks, outside any graph
    expected = [block.norm_in.per_example_sq_norms, block.norm_out.per_example_sq_norms]
    explained = torch._dynamo.explain(block)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    block.norm_in.per_example_sq_norms = block.norm_out.per_example_sq_norms = None
    torch.compile(block, backend="aot_eager")(x).backward(grad_out)
    torch.testing.assert_close([block.norm_in.per_example_sq_norms, block.norm_out.per_example_sq_norms], expected)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["layer_norm_bias", "rms_norm"])
def test_keeps_only_the_input_and_the_row_statistics(kind):
    # Beyond x and the parameters: the fp32 mean and rstd per row (rstd only for RMSNorm), as eager LayerNorm
    # keeps; no [rows, H] tensor (x̂ is recomputed in the backward).
    reference, ours = torch_and_fused(kind, 32)
    x = torch.randn(4, 8, 32, requires_grad=True)
    rows = 4 * 8
    assert saved_activation_bytes(ours, x) == rows * 4 * (1 if kind == "rms_norm" else 2)
    if kind != "rms_norm":
        assert saved_activation_bytes(ours, x) == saved_activation_bytes(reference, x)


# ------------------------------------------------------------------------------------------ the op


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.lightning_scaling
    with FakeTensorMode():
        x = torch.empty(4096, 1024, dtype=torch.bfloat16)
        w = torch.empty(1024)
        y, mean, rstd = ops.norm_forward(x, w, w, None, 1e-5, False)
        dx, dw, db, sq = ops.norm_backward(y, x, w, mean, rstd, True, False, 8)
        _, rms_mean, _ = ops.norm_forward(x, w, None, None, 1e-5, True)
        _, _, no_db, _ = ops.norm_backward(y, x, w, rms_mean, rstd, False, True, 8)
    assert y.shape == dx.shape == x.shape and y.dtype == dx.dtype == torch.bfloat16
    assert mean.shape == rstd.shape == (4096,) and mean.dtype == rstd.dtype == torch.float32
    assert dw.shape == db.shape == (1024,) and dw.dtype == torch.float32
    assert sq.shape == (8,) and sq.dtype == torch.float32
    assert rms_mean.shape == (0,) and no_db.shape == (0,)


def test_opcheck_on_the_cpu_path():
    x, weight, bias, grad_out = make_inputs((12, 20), "layer_norm_bias")
    ops = torch.ops.lightning_scaling
    sink = torch.zeros(12, requires_grad=True)
    torch.library.opcheck(
        ops.norm_forward, (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), sink, EPS, False)
    )
    _, mean, rstd = ops.norm_forward(x.detach(), weight.detach(), bias.detach(), None, EPS, False)
    torch.library.opcheck(ops.norm_backward, (grad_out, x.detach(), weight.detach(), mean, rstd, True, False, 3))


def test_flop_counts_model_flops_as_torch_norms_and_hardware_flops_by_the_formula():
    # Model FLOPs: norms count 0, as torch's counter counts nn.LayerNorm; the Linear's 3 × 2·rows·H·H remain.
    # Hardware FLOPs: the formula, LayerNorm with bias 7 per element forward, 13 backward, plus 2·B·H per
    # parameter vector for the per-example squared norms.
    from lightning_scaling.flops.counter import training_flop_counter

    torch.manual_seed(0)
    examples, tokens, width = 2, 5, 16
    rows = examples * tokens
    linear, ours, reference = nn.Linear(width, width), FusedLayerNorm(width), nn.LayerNorm(width)
    x = torch.randn(examples, tokens, width, requires_grad=True)
    gemms = 3 * 2 * rows * width * width
    for counter in (training_flop_counter(), FlopCounterMode(display=False)):
        for norm in (ours, reference):
            with counter:
                norm(linear(x)).sum().backward()
            assert counter.get_total_flops() == gemms, type(norm).__name__
    counter = training_flop_counter()
    with counter:
        ours(linear(x)).sum().backward()
    assert counter.hardware_flops == gemms + rows * width * (7 + 13) + 2 * examples * width * 2
    assert ours.per_example_sq_norms is not None


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fused_layer_norm([1.0], torch.ones(1)), "x must be a torch.Tensor"),
        (lambda: fused_layer_norm(torch.ones(2, 3, dtype=torch.long), torch.ones(3)), "x must be a floating-point"),
        (lambda: fused_layer_norm(torch.ones(2, 0), torch.ones(0)), "x must have at least one dimension and one"),
        (lambda: fused_layer_norm(torch.ones(2, 3), torch.ones(4)), r"weight must be 1-D \[H=3\]"),
        (lambda: fused_layer_norm(torch.ones(2, 3), torch.ones(3), torch.ones(2)), r"bias must be 1-D \[H=3\]"),
        (lambda: fused_layer_norm(torch.ones(2, 3), torch.ones(3), eps=-1.0), "eps must be a finite number"),
        (lambda: fused_rms_norm(torch.ones(2, 3), torch.ones(3), eps=float("nan")), "eps must be a finite number"),
        (
            lambda: fused_rms_norm(
                torch.ones(2, 3), torch.ones(3), per_example_sink=torch.zeros(3, requires_grad=True)
            ),
            r"per_example_sink must be 1-D \[2\]",
        ),
        (
            lambda: fused_rms_norm(torch.ones(2, 3), torch.ones(3), per_example_sink=torch.zeros(2)),
            "per_example_sink must require grad",
        ),
        (lambda: FusedLayerNorm((4, 8)), "normalized_shape must name one dimension"),
        (lambda: FusedLayerNorm(0), "normalized_shape must be a whole number"),
        (lambda: FusedLayerNorm(8, eps=None), "eps must be a finite number"),
        (lambda: FusedRMSNorm(8, elementwise_affine=1), "elementwise_affine must be True or False"),
        (lambda: FusedRMSNorm(8)(torch.ones(2, 7)), "x must end in normalized_shape=8"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_op_refuses_examples_that_do_not_divide_the_rows():
    x, weight, _, grad_out = make_inputs((6, 8), "rms_norm")
    _, mean, rstd = torch.ops.lightning_scaling.norm_forward(x, weight, None, None, EPS, True)
    with pytest.raises(ValueError, match="examples must be >= 1 and divide the number of rows"):
        torch.ops.lightning_scaling.norm_backward(grad_out, x, weight, mean, rstd, False, True, 4)
