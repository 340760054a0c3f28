"""lightning_scaling.laws.definitions: the laws against the reference values of docs/math.md §2 and §4 and
brute-force minimisations, law files, presets and where they were fitted; and bad input, fuzzed: every
argument either answers without NaN or is rejected with a ValueError that names it."""

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import FEW, FUZZ, answer_or_value_error, any_value, assert_finite, assert_no_nan, weird_numbers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lightning_scaling.laws.definitions import (
    BESIROGLU_2024,
    BESIROGLU_2024_FITTED_RANGE,
    DEFAULT_LAW,
    EXTRAPOLATION_MARGIN,
    HOFFMANN_2022,
    HOFFMANN_2022_FITTED_RANGE,
    LAWS,
    MUENNIGHOFF_2023,
    MUENNIGHOFF_2023_FITTED_RANGE,
    Allocation,
    ChinchillaLaw,
    DataConstrainedLaw,
    FittedRange,
    KaplanLaw,
    fitted_range,
    get_law,
    inference_optimal,
    law_from_dict,
    load_fitted_range,
    load_law,
)

PRESETS = [HOFFMANN_2022, BESIROGLU_2024, MUENNIGHOFF_2023]


# Sardana et al. 2023 / de Vries 2023: the printed A, B, E with alpha = 0.336, beta = 0.283
SARDANA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.336, beta=0.283)


def tokens_for_loss(law, params, loss):
    """D with L(params, D) = loss, from eq. 2 solved for D."""
    return (law.B / (loss - law.E - law.A * params**-law.alpha)) ** (1 / law.beta)


def test_muennighoff_reference_loss():
    assert DataConstrainedLaw().loss(6.34e9, 242e9, 25e9) == pytest.approx(2.2256440889984477, rel=1e-12)


@pytest.mark.parametrize("epochs, ratio", [(4, 3.726), (16, 10.58), (40, 15.17)])
def test_effective_tokens_table(epochs, ratio):
    law = DataConstrainedLaw()
    unique = 1e9
    assert law.effective_tokens(epochs * unique, unique) / unique == pytest.approx(ratio, abs=6e-4 * ratio)


def test_effective_tokens_ceiling_and_first_epoch():
    law = DataConstrainedLaw()
    assert law.effective_tokens(1e9 * 1e6, 1e9) / 1e9 == pytest.approx(16.39, abs=5e-3)
    assert law.effective_tokens(5e8, 1e9) == pytest.approx(5e8)  # less than one epoch: nothing lost
    assert law.repetition_value(5e8, 1e9) == 1.0
    # at R_D = R*_D repeated tokens are worth 1/e of fresh ones
    assert law.repetition_value(1e9 * (1 + law.r_star_d), 1e9) == pytest.approx(math.exp(-1))


def test_effective_params_cap():
    law = DataConstrainedLaw()
    # U_N = 0.051·U for the C4 fit (Muennighoff 2023, eq. 17)
    u_n = law.base_law.optimal_for_tokens(1e9).params
    assert u_n / 1e9 == pytest.approx(0.051, abs=5e-4)
    assert law.effective_params(0.5 * u_n, 1e9) == pytest.approx(0.5 * u_n)
    assert law.effective_params(1e6 * u_n, 1e9) / u_n == pytest.approx(1 + law.r_star_n, rel=1e-6)


def test_sardana_reference_loss():
    assert SARDANA.loss(70e9, 1e12) == pytest.approx(1.9473, abs=5e-5)


def test_default_law_is_twenty_tokens_per_param():
    assert DEFAULT_LAW is BESIROGLU_2024
    assert get_law("besiroglu") is BESIROGLU_2024 and get_law(" Besiroglu ") is BESIROGLU_2024
    # Hoffmann 2022, Table 3 (approach 1): params, FLOPs
    table3 = [
        (400e6, 1.92e19),
        (1e9, 1.21e20),
        (10e9, 1.23e22),
        (67e9, 5.76e23),
        (175e9, 3.85e24),
        (280e9, 9.90e24),
        (520e9, 3.43e25),
        (1e12, 1.27e26),
        (10e12, 1.30e28),
    ]
    params, flops = np.array(table3).T
    opt = DEFAULT_LAW.compute_optimal(flops)
    assert np.all(np.abs(opt.params / params - 1) < 0.25)
    assert np.all((opt.tokens_per_param > 14) & (opt.tokens_per_param < 25))
    assert np.mean(opt.tokens_per_param) == pytest.approx(20, abs=2)


@pytest.mark.parametrize("law", [*PRESETS, SARDANA], ids=lambda law: law.name or "sardana")
@pytest.mark.parametrize("flops", [1e18, 1e21, 1e24])
def test_closed_form_matches_brute_force(law, flops):
    opt = law.compute_optimal(flops)
    log_n = np.linspace(math.log(opt.params) - 6, math.log(opt.params) + 6, 400_001)
    n = np.exp(log_n)
    losses = law.loss(n, flops / (6 * n))
    best = np.argmin(losses)
    assert 0 < best < len(n) - 1
    assert n[best] == pytest.approx(opt.params, rel=1e-4)
    assert opt.loss <= losses[best] + 1e-12
    assert opt.flops == pytest.approx(flops, rel=1e-12)
    assert opt.params * opt.tokens * 6 == pytest.approx(flops, rel=1e-12)


def test_closed_form_exponents():
    law = BESIROGLU_2024
    a = law.compute_optimal(np.array([1e20, 1e22]))
    assert math.log(a.params[1] / a.params[0]) / math.log(100) == pytest.approx(0.3658 / (0.3478 + 0.3658))
    assert math.log(a.tokens[1] / a.tokens[0]) / math.log(100) == pytest.approx(0.3478 / (0.3478 + 0.3658))


@pytest.mark.parametrize("law", PRESETS, ids=lambda law: law.name)
def test_frontier_points_agree(law):
    opt = law.compute_optimal(3e22)
    for other in (
        law.optimal_for_params(opt.params),
        law.optimal_for_tokens(opt.tokens),
        law.optimal_for_loss(opt.loss),
    ):
        assert other.params == pytest.approx(opt.params, rel=1e-9)
        assert other.tokens == pytest.approx(opt.tokens, rel=1e-9)
        assert other.flops == pytest.approx(3e22, rel=1e-9)
        assert other.loss == pytest.approx(opt.loss, rel=1e-12)


def test_target_loss_formulas():
    law, target = HOFFMANN_2022, 2.1
    opt = law.optimal_for_loss(target)
    # docs/math.md §2: N_opt(l) = (A(1+α/β)/(l−E))^(1/α), D_opt(l) = (B(1+β/α)/(l−E))^(1/β)
    assert opt.params == pytest.approx((406.4 * (1 + 0.34 / 0.28) / (target - 1.69)) ** (1 / 0.34), rel=1e-12)
    assert opt.tokens == pytest.approx((410.7 * (1 + 0.28 / 0.34) / (target - 1.69)) ** (1 / 0.28), rel=1e-12)
    assert law.loss(opt.params, opt.tokens) == pytest.approx(target, rel=1e-12)
    # the cheapest run to that loss: any other model size needs more FLOPs
    for k in (0.5, 0.9, 1.1, 2.0):
        n = k * opt.params
        assert 6 * n * tokens_for_loss(law, n, target) > opt.flops


@pytest.mark.parametrize("flops", [1e20, 1e23, 1e25])
def test_de_vries_overhead(flops):
    law = SARDANA
    opt = law.compute_optimal(flops)
    n = 0.5 * opt.params
    d = tokens_for_loss(law, n, opt.loss)
    overhead = law.compute_overhead(n, d)
    assert overhead == pytest.approx(0.208, abs=5e-4)
    # de Vries 2023 closed form (docs/math.md §2)
    k_n, g = 0.5, law.G
    k_d = (1 - (k_n**-law.alpha - 1) * (law.A / law.B) * g ** -(law.alpha + law.beta)) ** (-1 / law.beta)
    assert overhead == pytest.approx(k_n * k_d - 1, rel=1e-9)


def test_overhead_zero_on_frontier_and_vectorised():
    law = DEFAULT_LAW
    opt = law.compute_optimal(np.logspace(18, 26, 9))
    assert np.allclose(law.compute_overhead(opt.params, opt.tokens), 0, atol=1e-9)
    over = law.compute_overhead(opt.params[4] * np.array([0.25, 0.5, 2, 4]), opt.tokens[4])
    assert over.shape == (4,) and np.all(over > 0.01)


def test_scalars_give_floats_arrays_give_arrays():
    law = DEFAULT_LAW
    assert isinstance(law.loss(1e9, 2e10), float)
    opt = law.compute_optimal(1e21)
    assert all(isinstance(v, float) for v in (opt.params, opt.tokens, opt.flops, opt.loss, opt.tokens_per_param))
    assert law.loss(np.array([1e9, 2e9]), 2e10).shape == (2,)
    assert json.loads(json.dumps(opt.to_dict()))["tokens_per_param"] == pytest.approx(opt.tokens_per_param)


def test_inference_optimal_reduces_to_compute_optimal():
    law, target = SARDANA, 2.0
    base = law.optimal_for_loss(target)
    for tokens in (0, 1e-3):
        alt = inference_optimal(law, target, tokens)
        assert alt.params == pytest.approx(base.params, rel=1e-7)
        assert alt.tokens == pytest.approx(base.tokens, rel=1e-7)


@pytest.mark.parametrize("inference_tokens", [1e11, 1e13, 1e15])
def test_inference_optimal_minimises_total_flops(inference_tokens):
    law, target = SARDANA, 2.0
    alt = inference_optimal(law, target, inference_tokens)
    base = law.optimal_for_loss(target)
    assert law.loss(alt.params, alt.tokens) == pytest.approx(target, rel=1e-9)
    assert alt.params < base.params and alt.tokens > base.tokens

    def total(n, d):
        return 6 * n * d + 2 * n * inference_tokens

    assert total(alt.params, alt.tokens) < total(base.params, base.tokens)
    n_min = (law.A / (target - law.E)) ** (1 / law.alpha)  # below this size the loss is out of reach
    n = np.exp(np.linspace(math.log(n_min) + 1e-6, math.log(base.params) + 1, 200_001))
    assert total(alt.params, alt.tokens) <= total(n, tokens_for_loss(law, n, target)).min() * (1 + 1e-9)


def test_inference_optimal_vectorised():
    alt = inference_optimal(DEFAULT_LAW, np.array([2.2, 2.5]), np.array([[1e12], [1e14]]))
    assert alt.params.shape == (2, 2)
    assert np.all(alt.params[1] < alt.params[0])  # more inference, smaller model


def test_kaplan_values():
    k = KaplanLaw()
    assert k.loss_params(1e9) == pytest.approx((8.8e13 / 1e9) ** 0.076)
    assert 2.2 < k.loss_params(1e9) < 2.5
    assert k.loss_tokens(5.4e13) == pytest.approx(1.0)
    assert k.loss_compute(8.64e19) == pytest.approx(3.1e8**0.05)  # 1 PF-day
    assert k.optimal_params(8.64e19) == pytest.approx(1.3e9)
    assert k.optimal_params(8.64e20) / k.optimal_params(8.64e19) == pytest.approx(10**0.73)
    # L(N, D) tends to (N_c/N)^α_N with ample data and falls with both N and D
    assert k.loss(1e9, 1e30) == pytest.approx((6.4e13 / 1e9) ** 0.076, rel=1e-6)
    assert k.loss(1e9, 1e10) > k.loss(1e9, 1e11) > k.loss(1e10, 1e11)
    # §5.1: B_crit ≈ 2e8 / L^(1/0.21) tokens, about a million tokens near L = 3
    assert k.critical_batch_size(3.0) == pytest.approx(2e8 / 3.0 ** (1 / 0.21))
    assert 5e5 < k.critical_batch_size(3.0) < 2e6
    assert k.critical_batch_size(2.5) > k.critical_batch_size(3.0)
    assert KaplanLaw.from_dict(k.to_dict()) == k


def test_data_constrained_optimum_without_repetition_is_chinchilla():
    law = DataConstrainedLaw()
    opt = law.compute_optimal(1e21, 1e16)
    base = MUENNIGHOFF_2023.compute_optimal(1e21)
    assert opt.params == pytest.approx(base.params, rel=1e-6)
    assert opt.loss == pytest.approx(base.loss, rel=1e-12)
    assert opt.epochs < 1 and opt.unique_tokens == 1e16


@pytest.mark.parametrize("unique", [1e9, 1e10, 5e10])
def test_data_constrained_optimum_matches_brute_force(unique):
    law, flops = DataConstrainedLaw(), 1e22
    opt = law.compute_optimal(flops, unique)
    n = np.logspace(6, 13, 200_001)
    brute = law.loss(n, flops / (6 * n), unique)
    assert opt.loss <= brute.min() + 1e-12
    assert opt.loss >= MUENNIGHOFF_2023.compute_optimal(flops).loss
    assert opt.epochs == pytest.approx(opt.tokens / unique)
    assert opt.epochs > 1
    assert opt.params == pytest.approx(n[np.argmin(brute)], rel=1e-3)


def test_data_constrained_optimum_vectorised():
    law = DataConstrainedLaw()
    opt = law.compute_optimal(np.logspace(19, 24, 6)[:, None], np.array([1e9, 1e11]))
    assert opt.params.shape == (6, 2) and np.all(np.isfinite(opt.loss))
    assert np.all(opt.loss[:, 0] >= opt.loss[:, 1])  # fewer unique tokens never help


def test_data_constrained_from_chinchilla():
    law = DataConstrainedLaw.from_chinchilla(BESIROGLU_2024)
    assert law.base_law.loss(1e9, 2e10) == BESIROGLU_2024.loss(1e9, 2e10)
    assert law.loss(1e9, 2e10, 1e11) == pytest.approx(BESIROGLU_2024.loss(1e9, 2e10))


@pytest.mark.parametrize(
    "law", [*PRESETS, KaplanLaw(), DataConstrainedLaw()], ids=lambda law: type(law).__name__ + law.name
)
def test_load_law_round_trip_with_extra_keys(law, tmp_path):
    path = tmp_path / "law.json"
    path.write_text(json.dumps({**law.to_dict(), "bootstrap": {"alpha": [0.3, 0.4]}, "n_runs": 240}))
    loaded = load_law(path)
    assert loaded == law and type(loaded) is type(law)
    assert type(law).from_dict(law.to_dict()) == law


LAW_FILE_PROBLEMS = [
    (b"", "is empty"),
    (b"  \n\t ", "is empty"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    ('{"E": 1.7, "name": "caf\u00e9"}'.encode("latin-1"), "is not UTF-8 text"),
    (b"not json", "is not JSON"),
    (b'{"E": 1.7,', "is not JSON"),
    (b"[1, 2]", "must be a dict.*got an array"),
    (b'"hoffmann"', "must be a dict.*got a string"),
    (b"null", "must be a dict.*got null"),
    (b'{"E": 1.7, "A": 400}', "lacks the key.*'B'"),
    (b"{}", "lacks the key"),
    (b'{"kind": "weird"}', r"\['kind'\] must be one of"),
    (b'{"kind": 3}', r"\['kind'\] must be one of"),
    (b'{"kind": "kaplan", "alpha_n": "0.076"}', r"\['alpha_n'\] must be a number, got a string"),
    (b'{"E": 1.7, "A": "400", "B": 400, "alpha": 0.3, "beta": 0.3}', r"\['A'\] must be a number, got a string"),
    (b'{"E": null, "A": 400, "B": 400, "alpha": 0.3, "beta": 0.3}', r"\['E'\] must be a number, got null"),
    (b'{"E": 1.7, "A": 400, "B": 400, "alpha": true, "beta": 0.3}', r"\['alpha'\] must be a number, got a boolean"),
    (b'{"E": 1.7, "A": 400, "B": [400], "alpha": 0.3, "beta": 0.3}', r"\['B'\] must be a number, got an array"),
    (b'{"E": 1.7, "A": 400, "B": 400, "alpha": 0.3, "beta": 0.3, "name": 5}', r"\['name'\] must be a string"),
    (b'{"E": NaN, "A": 400, "B": 400, "alpha": 0.3, "beta": 0.3}', "E must be a finite number"),
    (b'{"E": 1.7, "A": Infinity, "B": 400, "alpha": 0.3, "beta": 0.3}', "A must be a finite number"),
    (b'{"E": 1.7, "A": -1, "B": 400, "alpha": 0.3, "beta": 0.3}', "A must be a finite number > 0"),
    (b'{"E": 1.7, "A": 1' + b"0" * 400 + b', "B": 400, "alpha": 0.3, "beta": 0.3}', "A must be a finite"),
    (b"[" * 100_000 + b"]" * 100_000, "is not JSON"),
    (b'{"kind": "data_constrained", "r_star_d": 0}', "r_star_d must be"),
]


@pytest.mark.parametrize("content, match", LAW_FILE_PROBLEMS, ids=range(len(LAW_FILE_PROBLEMS)))
def test_load_law_names_the_file_and_the_problem(content, match, tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        load_law(path)
    message = str(err.value)
    assert "bad.json" in message and "\n" not in message, message


def test_load_law_on_a_non_utf8_file_is_a_value_error_not_unicode_decode_error(tmp_path):
    # issue 14: read_text() raised a bare UnicodeDecodeError, though the docstring promised a ValueError naming
    # the file (UnicodeDecodeError is a ValueError subclass, so check the class and the message both)
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"E": 1.7, "name": "caf\xe9"}')
    with pytest.raises(ValueError) as err:
        load_law(path)
    assert type(err.value) is ValueError
    assert "latin1.json" in str(err.value) and "UTF-8" in str(err.value) and "0xe9 at offset 23" in str(err.value)


def test_load_law_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(HOFFMANN_2022.to_dict()).encode())
    assert load_law(path) == HOFFMANN_2022


def test_load_law_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing.json.*cannot be read"):
        load_law(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="cannot be read"):
        load_law(tmp_path)  # a directory
    for bad in (None, 3, ["law.json"]):
        with pytest.raises(ValueError, match=r"^path must be"):
            load_law(bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([1], "d must be a dict"),
        ({"kind": "chinchilla"}, "d lacks the key"),
        ({"E": "1.7", "A": 1, "B": 1, "alpha": 0.3, "beta": 0.3}, r"d\['E'\] must be a number"),
    ],
)
def test_law_from_dict_names_d(bad, match):
    with pytest.raises(ValueError, match=match):
        law_from_dict(bad)
    with pytest.raises(ValueError, match=match):
        ChinchillaLaw.from_dict(bad)


@pytest.mark.parametrize("cls", [ChinchillaLaw, KaplanLaw, DataConstrainedLaw])
def test_law_name_must_be_a_string(cls):
    constants = {"E": 1.7, "A": 400, "B": 400, "alpha": 0.3, "beta": 0.3} if cls is ChinchillaLaw else {}
    with pytest.raises(ValueError, match=r"^name must be a string"):
        cls(**constants, name=5)
    assert cls(**constants, name="mine").name == "mine"


def test_besiroglu_preset_has_a_name_no_one_reads_as_a_training_epoch():
    assert BESIROGLU_2024.name == "besiroglu" and set(LAWS) == {"hoffmann", "besiroglu", "muennighoff"}
    assert all(law.name == key for key, law in LAWS.items())


def test_old_preset_name_epoch_still_works_with_a_future_warning():
    # FutureWarning, not DeprecationWarning: Python shows it to the people running a script by default
    with pytest.warns(FutureWarning, match="'epoch' is deprecated.*'besiroglu'"):
        assert get_law("epoch") is BESIROGLU_2024
    with pytest.warns(FutureWarning):
        assert get_law("EPOCH") is BESIROGLU_2024


def test_get_law_rejects_unknown_names_and_wrong_types_by_name():
    for bad in (None, 3, ["hoffmann"], "kaplan", "kaplan-2020"):
        with pytest.raises(ValueError, match=r"^law must be one of"):
            get_law(bad)


def test_presets_know_where_they_were_fitted():
    assert fitted_range(HOFFMANN_2022) is HOFFMANN_2022_FITTED_RANGE
    assert fitted_range(BESIROGLU_2024) is BESIROGLU_2024_FITTED_RANGE
    assert fitted_range(MUENNIGHOFF_2023) is MUENNIGHOFF_2023_FITTED_RANGE
    assert fitted_range(DataConstrainedLaw.from_chinchilla(HOFFMANN_2022)) is HOFFMANN_2022_FITTED_RANGE
    # matched by constants, whatever the name; any other law has no known range
    copy = ChinchillaLaw(
        BESIROGLU_2024.E, BESIROGLU_2024.A, BESIROGLU_2024.B, BESIROGLU_2024.alpha, BESIROGLU_2024.beta, name="copy"
    )
    assert fitted_range(copy) is BESIROGLU_2024_FITTED_RANGE
    assert fitted_range(ChinchillaLaw(E=1.7, A=400, B=400, alpha=0.3, beta=0.3)) is None
    assert fitted_range(KaplanLaw()) is None and fitted_range("hoffmann") is None
    # Hoffmann et al. 2022, abstract: 70M to 16B parameters on 5B to 500B tokens
    assert HOFFMANN_2022_FITTED_RANGE.params == (7e7, 1.6e10) and HOFFMANN_2022_FITTED_RANGE.tokens == (5e9, 5e11)
    assert HOFFMANN_2022_FITTED_RANGE.describe() == "70M to 16B parameters and 5B to 500B tokens"
    assert MUENNIGHOFF_2023_FITTED_RANGE.describe() == "up to 9B parameters and up to 900B tokens"


def test_fitted_range_outside_uses_the_margin():
    fitted = HOFFMANN_2022_FITTED_RANGE
    assert EXTRAPOLATION_MARGIN == 10
    assert fitted.outside(1.6e11, 5e12) == []  # exactly 10x: still inside
    assert fitted.outside(7e6, 5e8) == []
    far = fitted.outside(1.7e11, 4.9e8)
    assert len(far) == 2 and "over 10x the largest fitted (16B)" in far[0] and "under 1/10" in far[1]
    assert fitted.outside(1e12, 1e9, margin=1000) == []
    with pytest.raises(ValueError, match="margin"):
        fitted.outside(1e9, 1e9, margin=0)
    assert FittedRange.from_dict(fitted.to_dict()) == fitted
    for bad in (
        {"params": (1, 2)},
        {"params": (2, 1), "tokens": (1, 2)},
        {"params": (1, 2, 3), "tokens": (1, 2)},
        {"params": (-1, 2), "tokens": (1, 2)},
    ):
        with pytest.raises(ValueError, match=r"params|tokens"):
            FittedRange.from_dict(bad)


def test_load_fitted_range_reads_what_fit_out_records(tmp_path):
    path = tmp_path / "fitted.json"
    path.write_text(
        json.dumps({**HOFFMANN_2022.to_dict(), "fit": {"fitted_range": {"params": [1e6, 1e8], "tokens": [1e7, 1e9]}}})
    )
    assert load_fitted_range(path) == FittedRange(params=(1e6, 1e8), tokens=(1e7, 1e9))
    path.write_text(json.dumps(HOFFMANN_2022.to_dict()))
    assert load_fitted_range(path) is None
    path.write_text(json.dumps({**HOFFMANN_2022.to_dict(), "fit": {"fitted_range": {"params": "x"}}}))
    with pytest.raises(ValueError, match=r"fitted.json.*fitted range"):
        load_fitted_range(path)


def test_epochs_at_value_follows_muennighoff_eq5():
    law = DataConstrainedLaw()
    assert law.epochs_at_value(0.01) == pytest.approx(1 + 15.387756 * math.log(100))
    assert law.repetition_value(1e9 * law.epochs_at_value(0.01), 1e9) == pytest.approx(0.01)
    for bad in (0, 1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="value"):
            law.epochs_at_value(bad)


@pytest.mark.parametrize("law", PRESETS, ids=lambda law: law.name)
def test_unreachable_target_loss(law):
    with pytest.raises(ValueError, match="cannot reach"):
        law.optimal_for_loss(law.E)
    with pytest.raises(ValueError, match="cannot reach"):
        inference_optimal(law, law.E - 0.1, 1e12)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: DEFAULT_LAW.loss(-1, 1e9), "params"),
        (lambda: DEFAULT_LAW.loss(1e9, float("nan")), "tokens"),
        (lambda: DEFAULT_LAW.compute_optimal(float("inf")), "flops"),
        (lambda: DEFAULT_LAW.compute_optimal([]), "flops"),
        (lambda: DEFAULT_LAW.compute_overhead(1e9, "many"), "tokens"),
        (lambda: DEFAULT_LAW.loss(np.ones(2), np.ones(3)), "params and tokens"),
        (lambda: DataConstrainedLaw().compute_optimal(1e21, 0), "unique_tokens"),
        (lambda: inference_optimal(DEFAULT_LAW, 2.5, -1), "inference_tokens"),
        (lambda: inference_optimal(KaplanLaw(), 2.5, 1), "law"),
        (lambda: KaplanLaw().critical_batch_size(0), "loss"),
        (lambda: ChinchillaLaw(E=1.7, A=400, B=400, alpha=0, beta=0.3), "alpha"),
        (lambda: DataConstrainedLaw(r_star_d=-1), "r_star_d"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_allocation_is_frozen():
    alloc = Allocation(params=1.0, tokens=20.0, flops=120.0, loss=3.0)
    assert alloc.tokens_per_param == 20.0
    with pytest.raises(AttributeError):
        alloc.params = 2.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: DEFAULT_LAW.compute_optimal(5e-324),
        lambda: DEFAULT_LAW.compute_optimal(1e308),
        lambda: DataConstrainedLaw().compute_optimal(5e-324, 1.0),
        lambda: DataConstrainedLaw().compute_optimal(5e-324, 5e-324),
        lambda: DEFAULT_LAW.optimal_for_params(5e-324),
        lambda: inference_optimal(DEFAULT_LAW, 1.8172 + 1e-12, 1e30),
    ],
)
def test_extreme_inputs_give_no_nan(call):
    alloc = call()
    for value in (alloc.params, alloc.tokens, alloc.loss, alloc.tokens_per_param):
        assert not math.isnan(value) and value > 0


def test_data_constrained_optimum_never_returns_infinite_epochs():
    # issue 14: epochs = tokens / unique_tokens overflowed to inf and came back as a valid answer
    with pytest.raises(ValueError, match=r"^flops and unique_tokens out of range.*epochs"):
        DataConstrainedLaw().compute_optimal(1e21, 1e-300)
    with pytest.raises(ValueError, match=r"^flops and unique_tokens out of range"):
        DataConstrainedLaw().compute_optimal([1e21, 1e20], [1e10, 1e-300])
    with pytest.raises(ValueError, match=r"^flops and unique_tokens out of range"):
        DataConstrainedLaw().compute_optimal(1e308, 5e-324)


def test_no_allocation_holds_infinite_flops():
    # N and D both fit a float but 6·N·D does not: an Allocation with flops=inf used to come back
    with pytest.raises(ValueError, match=r"^tokens out of range.*FLOPs"):
        BESIROGLU_2024.optimal_for_tokens(6.0606e150)  # 4.9e156 parameters: both finite, their product is not
    with pytest.raises(ValueError, match=r"^params out of range.*FLOPs"):
        BESIROGLU_2024.optimal_for_params(1e160)


def test_allocation_out_of_float_range_is_a_value_error():
    with pytest.raises(ValueError, match=r"^loss and inference_tokens out of range"):
        inference_optimal(DEFAULT_LAW, 1e300, 1e300)


ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(1e-30, 1e30), st.sampled_from([5e-324, 1e-300, 1e308])
)


@settings(max_examples=150, deadline=None)
@given(params=ANY_FLOAT, tokens=ANY_FLOAT, unique=ANY_FLOAT)
def test_property_laws_never_return_nan(params, tokens, unique):
    calls = [
        (("params", "tokens"), lambda: DEFAULT_LAW.loss(params, tokens)),
        (("params", "tokens"), lambda: DEFAULT_LAW.compute_overhead(params, tokens)),
        (("params",), lambda: DEFAULT_LAW.optimal_for_params(params)),
        (("tokens",), lambda: DEFAULT_LAW.optimal_for_tokens(tokens)),
        (("flops",), lambda: DEFAULT_LAW.compute_optimal(params)),
        (("params", "tokens", "unique_tokens"), lambda: DataConstrainedLaw().loss(params, tokens, unique)),
        (("flops", "unique_tokens"), lambda: DataConstrainedLaw().compute_optimal(params, unique)),
        (("loss",), lambda: DEFAULT_LAW.optimal_for_loss(params)),
        (("loss", "inference_tokens"), lambda: inference_optimal(DEFAULT_LAW, params, tokens)),
    ]
    for names, call in calls:
        try:
            value = call()
        except ValueError as err:
            assert str(err).startswith(names), str(err)
            continue
        if isinstance(value, Allocation):
            assert not np.isnan([value.params, value.tokens, value.loss, value.tokens_per_param]).any()
        else:
            assert not np.isnan(value)


# -------------------------------------------------------------------------------------------------- bad input, fuzzed


@FUZZ
@given(params=weird_numbers, tokens=weird_numbers)
# a Python int beyond 1e308: np.asarray(value, dtype=float) raises OverflowError in _validation.positive_array
@example(params=1e9, tokens=10**400)
def test_chinchilla_loss_and_overhead_reject_or_stay_finite(params, tokens):
    for law in (HOFFMANN_2022, BESIROGLU_2024):
        loss = answer_or_value_error(lambda law=law: law.loss(params, tokens), "params", "tokens")
        if loss is not None:
            assert_no_nan(loss)
            assert loss >= law.E
        overhead = answer_or_value_error(lambda law=law: law.compute_overhead(params, tokens), "params", "tokens")
        if overhead is not None:
            assert_no_nan(overhead)
            assert overhead >= 0


@FUZZ
@given(flops=weird_numbers)
def test_chinchilla_compute_optimal_rejects_or_gives_no_nan(flops):
    result = answer_or_value_error(lambda: BESIROGLU_2024.compute_optimal(flops), "flops")
    if result is not None:
        assert_no_nan(result)
        assert result.params > 0 and result.tokens > 0


# A law's constants are user input too (a fitted law, a --law-file): construction validates them, and every
# method then either rejects its own argument by name or answers without NaN.
law_constants = st.fixed_dictionaries(
    {
        "E": st.floats(min_value=0, max_value=10),
        "A": st.floats(min_value=1e-300, max_value=1e300),
        "B": st.floats(min_value=1e-300, max_value=1e300),
        "alpha": st.floats(min_value=1e-3, max_value=5),
        "beta": st.floats(min_value=1e-3, max_value=5),
    }
)


@FUZZ
@given(constants=law_constants, flops=st.floats(min_value=1e-10, max_value=1e40))
# the compute-optimal frontier constant G = (alpha*A/(beta*B))**(1/(alpha+beta)) overflows a Python float
@example(constants={"E": 1.0, "A": 1e200, "B": 1.0, "alpha": 0.01, "beta": 0.01}, flops=1e20)
# ... or underflows to 0, and math.log(0) raises "math domain error", naming nothing
@example(constants={"E": 1.0, "A": 1e-300, "B": 1e300, "alpha": 1.0, "beta": 1.0}, flops=1e20)
def test_any_valid_law_answers_compute_optimal_without_crashing(constants, flops):
    law = ChinchillaLaw(**constants)
    names = ("flops", "E", "A", "B", "alpha", "beta", "law")
    result = answer_or_value_error(lambda: law.compute_optimal(flops), *names)
    if result is not None:
        assert_no_nan(result)
    overhead = answer_or_value_error(lambda: law.compute_overhead(1e9, 2e10), *names, "params", "tokens")
    if overhead is not None:
        assert_no_nan(overhead)


@FUZZ
@given(bad=weird_numbers, key=st.sampled_from(["E", "A", "B", "alpha", "beta"]))
def test_law_constructor_rejects_bad_constants_by_name(bad, key):
    constants = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    constants[key] = bad
    law = answer_or_value_error(lambda: ChinchillaLaw(**constants), key)
    if law is not None:
        assert math.isfinite(getattr(law, key))


@FUZZ
@given(params=weird_numbers, tokens=weird_numbers, unique=weird_numbers)
def test_data_constrained_law_rejects_or_gives_no_nan(params, tokens, unique):
    law = DataConstrainedLaw()
    for fn, names in (
        (lambda: law.loss(params, tokens, unique), ("params", "tokens", "unique_tokens")),
        (lambda: law.effective_tokens(tokens, unique), ("tokens", "unique_tokens")),
        (lambda: law.effective_params(params, unique), ("params", "unique_tokens")),
        (lambda: law.repetition_value(tokens, unique), ("tokens", "unique_tokens")),
    ):
        assert_no_nan(answer_or_value_error(fn, *names))


@FEW
@given(flops=weird_numbers, unique=weird_numbers)
def test_data_constrained_optimum_rejects_or_gives_no_nan(flops, unique):
    result = answer_or_value_error(
        lambda: DataConstrainedLaw().compute_optimal(flops, unique), "flops", "unique_tokens"
    )
    if result is not None:
        assert_no_nan(result)
        assert result.params > 0 and result.tokens > 0


@FUZZ
@given(loss=weird_numbers, inference=weird_numbers)
def test_inference_optimal_rejects_or_gives_no_nan(loss, inference):
    result = answer_or_value_error(
        lambda: inference_optimal(BESIROGLU_2024, loss, inference), "loss", "inference_tokens"
    )
    if result is not None:
        assert_no_nan(result)
        assert result.params > 0 and result.tokens > 0


@pytest.mark.parametrize(
    "call_it",
    [
        lambda: BESIROGLU_2024.loss(10**400, 1e9),
        lambda: BESIROGLU_2024.compute_optimal(10**400),
        lambda: DataConstrainedLaw().effective_tokens(1e9, 10**400),
        lambda: ChinchillaLaw(E=10**400, A=1, B=1, alpha=0.3, beta=0.3),
    ],
)
def test_huge_python_ints_are_rejected_by_name_not_overflow_error(call_it):
    with pytest.raises(ValueError, match=r"params|flops|unique_tokens|E"):
        call_it()


def test_inference_optimal_rejects_a_law_that_is_not_one():
    with pytest.raises(ValueError, match="law"):
        inference_optimal("hoffmann", 2.5, 1e12)


# Every public argument of the laws module, one at a time, with any value a user might pass: a ValueError that
# names the argument, or an answer without NaN (and an Allocation without inf).


LAW_DEFAULTS = {
    ChinchillaLaw: {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "name": "x"},
    KaplanLaw: {f.name: getattr(KaplanLaw(), f.name) for f in dataclasses.fields(KaplanLaw)},
    DataConstrainedLaw: {f.name: getattr(DataConstrainedLaw(), f.name) for f in dataclasses.fields(DataConstrainedLaw)},
}


@FUZZ
@given(case=st.sampled_from([(cls, arg) for cls, args in LAW_DEFAULTS.items() for arg in args]), value=any_value)
def test_every_law_constructor_argument_rejects_by_name_or_stores_a_finite_value(case, value):
    cls, arg = case
    law = answer_or_value_error(lambda: cls(**{**LAW_DEFAULTS[cls], arg: value}), arg)
    if law is not None:
        assert isinstance(law.name, str)
        assert_finite({f.name: getattr(law, f.name) for f in dataclasses.fields(law) if f.name != "name"})


_DC = DataConstrainedLaw()
_KAPLAN = KaplanLaw()
LAW_CALLS = [
    ("params", lambda v: BESIROGLU_2024.loss(v, 1e10)),
    ("tokens", lambda v: BESIROGLU_2024.loss(1e9, v)),
    ("flops", lambda v: BESIROGLU_2024.compute_optimal(v)),
    ("params", lambda v: BESIROGLU_2024.optimal_for_params(v)),
    ("tokens", lambda v: BESIROGLU_2024.optimal_for_tokens(v)),
    ("loss", lambda v: BESIROGLU_2024.optimal_for_loss(v)),
    ("params", lambda v: BESIROGLU_2024.compute_overhead(v, 1e10)),
    ("tokens", lambda v: BESIROGLU_2024.compute_overhead(1e9, v)),
    ("params", lambda v: _KAPLAN.loss(v, 1e10)),
    ("tokens", lambda v: _KAPLAN.loss(1e9, v)),
    ("params", lambda v: _KAPLAN.loss_params(v)),
    ("tokens", lambda v: _KAPLAN.loss_tokens(v)),
    ("flops", lambda v: _KAPLAN.loss_compute(v)),
    ("loss", lambda v: _KAPLAN.critical_batch_size(v)),
    ("flops", lambda v: _KAPLAN.optimal_params(v)),
    ("tokens", lambda v: _DC.effective_tokens(v, 1e9)),
    ("unique_tokens", lambda v: _DC.effective_tokens(1e10, v)),
    ("params", lambda v: _DC.effective_params(v, 1e9)),
    ("unique_tokens", lambda v: _DC.effective_params(1e9, v)),
    ("tokens", lambda v: _DC.repetition_value(v, 1e9)),
    ("unique_tokens", lambda v: _DC.repetition_value(1e10, v)),
    ("params", lambda v: _DC.loss(v, 1e10, 1e9)),
    ("tokens", lambda v: _DC.loss(1e9, v, 1e9)),
    ("unique_tokens", lambda v: _DC.loss(1e9, 1e10, v)),
    ("flops", lambda v: _DC.compute_optimal(v, 1e10)),
    ("unique_tokens", lambda v: _DC.compute_optimal(1e21, v)),
    ("value", lambda v: _DC.epochs_at_value(v)),
    ("law", lambda v: DataConstrainedLaw.from_chinchilla(v)),
    ("r_star_d", lambda v: DataConstrainedLaw.from_chinchilla(HOFFMANN_2022, r_star_d=v)),
    ("r_star_n", lambda v: DataConstrainedLaw.from_chinchilla(HOFFMANN_2022, r_star_n=v)),
    ("law", lambda v: inference_optimal(v, 2.5, 1e12)),
    ("loss", lambda v: inference_optimal(BESIROGLU_2024, v, 1e12)),
    ("inference_tokens", lambda v: inference_optimal(BESIROGLU_2024, 2.5, v)),
    ("law", lambda v: get_law(v)),
    ("d", lambda v: law_from_dict(v)),
    ("d", lambda v: ChinchillaLaw.from_dict(v)),
    ("d", lambda v: KaplanLaw.from_dict(v)),
    ("d", lambda v: DataConstrainedLaw.from_dict(v)),
    ("path", lambda v: load_law(v) if not isinstance(v, str) else None),  # strings: the file tests below
    ("params", lambda v: FittedRange(params=v, tokens=(1.0, 2.0))),
    ("tokens", lambda v: FittedRange(params=(1.0, 2.0), tokens=v)),
    ("source", lambda v: FittedRange(params=(1.0, 2.0), tokens=(1.0, 2.0), source=v)),
    ("params", lambda v: HOFFMANN_2022_FITTED_RANGE.outside(v, 1e10)),
    ("tokens", lambda v: HOFFMANN_2022_FITTED_RANGE.outside(1e9, v)),
    ("margin", lambda v: HOFFMANN_2022_FITTED_RANGE.outside(1e9, 1e10, margin=v)),
    ("d", lambda v: FittedRange.from_dict(v)),
]


@FUZZ
@given(case=st.sampled_from(range(len(LAW_CALLS))), value=any_value)
@example(case=25, value=1e-300)  # DataConstrainedLaw.compute_optimal(1e21, 1e-300): epochs overflowed to inf
def test_every_law_function_argument_rejects_by_name_or_answers_without_nan(case, value):
    name, fn = LAW_CALLS[case]
    names = (f"{name} ", f"{name}[", f"{name},", f"{name}:", f"{name} and", f"and {name}") if name == "d" else (name,)
    result = answer_or_value_error(lambda: fn(value), *names)
    if isinstance(result, Allocation):
        assert_finite(result)
        assert np.all(np.asarray(result.params) > 0) and np.all(np.asarray(result.tokens) > 0)
    elif result is not None:
        assert_no_nan(result)
    assert fitted_range(value) is None or isinstance(value, (ChinchillaLaw, DataConstrainedLaw))


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-10, 10**30),
        st.text(max_size=6),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
LAW_KEYS = ["kind", "E", "A", "B", "alpha", "beta", "name", "r_star_d", "r_star_n", "alpha_n", "n_c", "fit"]
law_like = st.builds(
    lambda base, changes, drop: {**{k: v for k, v in base.items() if k not in drop}, **changes},
    st.sampled_from([HOFFMANN_2022.to_dict(), KaplanLaw().to_dict(), DataConstrainedLaw().to_dict(), {}]),
    st.dictionaries(
        st.sampled_from(LAW_KEYS),
        st.one_of(
            json_values, st.sampled_from(["chinchilla", "kaplan", "data_constrained", 0.3, -1.0, 0.0, 1e308, 1e-320])
        ),
        max_size=3,
    ),
    st.lists(st.sampled_from(LAW_KEYS), max_size=2),
)
law_file_bytes = st.one_of(
    st.binary(max_size=48),
    json_values.map(lambda v: json.dumps(v).encode()),
    law_like.map(lambda v: json.dumps(v).encode()),
    law_like.map(lambda v: json.dumps(v).encode()[: len(json.dumps(v)) // 2]),  # cut short
    law_like.map(lambda v: json.dumps(v).encode("utf-16")),
    st.sampled_from([b"", b"   ", b"\xef\xbb\xbf", b"\x00" * 8, b"NaN", b'{"E": NaN}', b"[" * 50_000]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=law_file_bytes)
def test_load_law_on_any_file_gives_a_valid_law_or_one_value_error_naming_the_file(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "some law.json"
        path.write_bytes(content)
        try:
            law = load_law(path)
        except ValueError as err:
            message = str(err)
            assert type(err) is ValueError, repr(err)  # not a UnicodeDecodeError or JSONDecodeError
            assert message.startswith(f"law file {str(path)!r} "), message
            assert "\n" not in message
            return
    assert isinstance(law, (ChinchillaLaw, KaplanLaw, DataConstrainedLaw))
    assert_finite({f.name: getattr(law, f.name) for f in dataclasses.fields(law) if f.name != "name"})
