"""The distinct-sample sketch: the 64-bit hash against a pure-Python reference, and the HyperLogLog estimate
within its stated bound (relative standard error 1.04/sqrt(m); ≤ 2% at 1e6 distinct samples, p = 14)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_scaling.estimators.distinct_samples import HyperLogLog, hash_rows, mix64

M64 = (1 << 64) - 1


def _mix64_reference(x: int) -> int:
    # splitmix64's finaliser on Python ints (unsigned 64-bit), the oracle for the int64 torch version
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _stream(distinct: int, total: int, seed: int = 0) -> torch.Tensor:
    """`total` samples (rows of 4 token ids) with exactly `distinct` distinct ones, shuffled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.arange(distinct), torch.randint(distinct, (total - distinct,), generator=g)])
    ids = ids[torch.randperm(total, generator=g)]
    return torch.stack([ids % 50_000, ids // 50_000, ids % 7, torch.zeros_like(ids)], dim=1)


def test_mix64_matches_the_reference_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randint(-(2**63), 2**63 - 1, (200,), generator=g, dtype=torch.int64),
            torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)]),
        ]
    )
    got = [v & M64 for v in mix64(values).tolist()]
    assert got == [_mix64_reference(v) for v in values.tolist()]


def test_hash_rows_equal_rows_equal_hashes_and_padding_ignored():
    rows = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 0], [3, 2, 1, 0], [1, 2, 3, 9], [1, 2, 0, 0]])
    h = hash_rows(rows).tolist()
    assert h[0] == h[1] and len(set(h[1:])) == 4  # order and every token matter
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    hm = hash_rows(rows, mask).tolist()
    assert hm[0] == hm[3]  # same real tokens, different padding
    assert hm[0] != hm[4]  # [1, 2, 3] vs [1, 2, 0, 0]: lengths differ
    assert hash_rows(rows, seed=1).tolist() != h  # independent hash functions by seed
    assert hash_rows(torch.tensor([5, 6])).shape == (2,)  # 1-d: one token per sample
    assert hash_rows(torch.randn(3, 4)).unique().numel() == 3  # floats hash by their bits


def test_hash_rows_no_collisions_among_a_million_distinct_rows():
    rows = _stream(1_000_000, 1_000_000)
    assert hash_rows(rows).unique().numel() == 1_000_000


def test_error_within_two_percent_at_a_million_distinct():
    # precision 14: relative standard error 1.04/sqrt(16384) = 0.81%; 2% is 2.46 standard errors.
    sketch = HyperLogLog(14)
    assert sketch.relative_error == pytest.approx(1.04 / 128)
    rows = _stream(1_000_000, 1_500_000)  # one third of the stream repeats earlier samples
    for chunk in rows.split(100_000):
        sketch.add_rows(chunk)
    assert sketch.estimate() == pytest.approx(1_000_000, rel=0.02)


@pytest.mark.parametrize(
    "distinct, total", [(1, 50), (1_000, 20_000), (10_000, 10_000), (30_000, 90_000), (200_000, 300_000)]
)
def test_known_duplicate_rates_within_three_standard_errors(distinct, total):
    sketch = HyperLogLog(14)
    sketch.add_rows(_stream(distinct, total))
    bound = 3 * sketch.relative_error
    if distinct <= sketch.m // 10:  # few distinct values: the estimate is nearly linear counting, ~exact
        bound = 0.01
    assert sketch.estimate() / distinct == pytest.approx(1.0, abs=bound)


def test_standard_error_matches_the_stated_bound():
    # 100 independent hash functions, m = 1024, 20,000 distinct samples: the estimate is unbiased and its
    # RMS relative error is 1.04/sqrt(m) = 3.25% (allowing for the sampling error of 100 trials, ~7%).
    hashes = hash_rows(_stream(20_000, 20_000))
    errors = []
    for seed in range(100):
        sketch = HyperLogLog(10)
        sketch.add_hashes(mix64(hashes ^ mix64(torch.tensor(seed))))  # a seeded bijection: a new hash function
        errors.append(sketch.estimate() / 20_000 - 1)
    errors = torch.tensor(errors, dtype=torch.float64)
    stated = 1.04 / math.sqrt(1024)
    assert errors.pow(2).mean().sqrt().item() == pytest.approx(stated, rel=0.2)
    assert abs(errors.mean().item()) < 3 * stated / 10


def test_merge_is_the_sketch_of_the_union():
    rows = _stream(50_000, 80_000)
    whole, left, right = HyperLogLog(12), HyperLogLog(12), HyperLogLog(12)
    whole.add_rows(rows)
    left.add_rows(rows[:30_000])
    right.add_rows(rows[30_000:])
    assert torch.equal(left.merge_(right).registers, whole.registers)
    assert left.estimate() == whole.estimate()
    with pytest.raises(ValueError, match="other"):
        left.merge_(HyperLogLog(10))


def test_empty_state_dict_and_validation():
    sketch = HyperLogLog(8)
    assert sketch.estimate() == 0.0
    sketch.add_hashes(torch.empty(0, dtype=torch.int64))
    assert sketch.estimate() == 0.0
    sketch.add_rows(_stream(100, 300))
    copy = HyperLogLog(8)
    copy.load_state_dict(sketch.state_dict())
    assert copy.estimate() == sketch.estimate() and copy.estimate() == pytest.approx(100, rel=0.05)
    sketch.reset()
    assert sketch.estimate() == 0.0
    for bad in (3, 19, 2.5, "14"):
        with pytest.raises(ValueError, match="precision"):
            HyperLogLog(bad)
    with pytest.raises(ValueError, match="precision"):
        HyperLogLog(9).load_state_dict(copy.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_same_registers_as_on_the_cpu():
    rows = _stream(100_000, 150_000)
    cpu, gpu = HyperLogLog(14), HyperLogLog(14, device="cuda")
    cpu.add_rows(rows)
    gpu.add_rows(rows.cuda())
    assert torch.equal(gpu.registers.cpu(), cpu.registers)
