"""Payback arithmetic of compressed models (wattlog.payback): plain numbers, no framework."""

from __future__ import annotations

import math

import pytest

from wattlog import keys, payback


def test_payback_is_make_energy_over_the_saving_per_sample() -> None:
    # 300 J to make, 0.30 -> 0.20 J per sample: 0.1 J saved per sample -> 3000 samples
    assert payback.payback_samples(300.0, 0.20, 0.30) == pytest.approx(3000.0)


def test_free_to_make_pays_back_at_once() -> None:
    assert payback.payback_samples(0.0, 0.19, 0.29) == 0.0


@pytest.mark.parametrize("variant", [0.30, 0.31])
def test_no_saving_never_pays_back(variant: float) -> None:
    assert payback.payback_samples(500.0, variant, 0.30) == math.inf
    assert payback.payback_samples(0.0, variant, 0.30) == math.inf  # free, but nothing saved


@pytest.mark.parametrize("args", [(-1.0, 0.2, 0.3), (math.nan, 0.2, 0.3), (1.0, 0.0, 0.3), (1.0, 0.2, math.inf)])
def test_bad_inputs_are_rejected(args: tuple) -> None:
    with pytest.raises(ValueError):
        payback.payback_samples(*args)


def test_mlflow_fields_never_log_infinity() -> None:
    assert payback.mlflow_fields(1500.0) == ({keys.PAYBACK_SAMPLES: 1500.0}, {})
    assert payback.mlflow_fields(math.inf) == ({}, {keys.T_PAYBACK: "never"})
    assert payback.mlflow_fields(math.nan, is_baseline=True) == ({}, {keys.T_PAYBACK: "baseline"})
    assert payback.mlflow_fields(math.nan) == ({}, {})


def test_make_energy_from_the_make_stages() -> None:
    assert payback.make_energy_j({"energy/recover_j": 120.0, "energy/test_j": 9.0}) == 120.0
    assert payback.make_energy_j({"energy/distill_j": 80.0}) == 80.0
    assert payback.make_energy_j({keys.MAKE_J: 42.0, "energy/recover_j": 1.0}) == 42.0  # logged value wins
    assert payback.make_energy_j({"energy/test_j": 9.0, keys.MAKE_J: math.nan}) == 0.0  # quantisation only


@pytest.mark.parametrize(("value", "text"), [(0.0, "0"), (850.0, "850"), (1234.0, "1.23k"), (4.5e6, "4.50M"),
                                             (math.inf, "never"), (math.nan, "—"), (None, "—")])
def test_describe(value: float | None, text: str) -> None:
    assert payback.describe(value) == text


def test_spread_propagates_and_saving_inside_the_noise_is_flagged() -> None:
    p = payback.payback_samples(300.0, 0.20, 0.30)
    assert payback.payback_spread(p, 300.0, 30.0, 0.1, 0.01) == pytest.approx(3000 * math.hypot(0.1, 0.1))
    assert payback.payback_spread(0.0, 0.0, math.nan, 0.1, 0.02) == 0.0
    assert math.isnan(payback.payback_spread(math.inf, 300.0, 1.0, -0.1, 0.01))
    assert payback.saving_in_spread(0.01, 0.01, 0.01)
    assert not payback.saving_in_spread(0.1, 0.01, 0.01)
    assert not payback.saving_in_spread(0.1, math.nan, None)  # unknown spread proves nothing either way


def test_add_payback_ranks_summary_rows() -> None:
    j = keys.stage_j_per_sample("test")
    rows = [
        {"run_name": "distill", keys.MAKE_J: 400.0, j: 0.15, "test_acc": 0.66},
        {"run_name": "none", keys.MAKE_J: 0.0, j: 0.29, "test_acc": 0.70},
        {"run_name": "none", keys.MAKE_J: 0.0, j: 0.31, "test_acc": 0.70},
        {"run_name": "int8", keys.MAKE_J: 0.0, j: 0.20, "test_acc": 0.68},
        {"run_name": "l1", keys.MAKE_J: 100.0, j: 0.32, "test_acc": 0.62},
        {"run_name": "broken", keys.MAKE_J: math.nan, j: math.nan, "test_acc": math.nan},
    ]
    base = payback.add_payback(rows, lambda r: r["run_name"] == "none", metric="test_acc")
    assert base == pytest.approx(0.30)
    assert [r["run_name"] for r in rows] == ["none", "none", "int8", "distill", "l1", "broken"]
    by = {r["run_name"]: r for r in rows}
    assert by["int8"][keys.PAYBACK_SAMPLES] == 0.0
    assert by["distill"][keys.PAYBACK_SAMPLES] == pytest.approx(400.0 / 0.15)
    assert by["distill"]["payback"] == "2.67k"
    assert by["l1"][keys.PAYBACK_SAMPLES] == math.inf and by["l1"]["payback"] == "never"
    assert by["none"]["payback"] == "baseline" and math.isnan(by["none"][keys.PAYBACK_SAMPLES])
    assert by["int8"]["delta_test_acc"] == pytest.approx(-0.02)
    assert by["broken"]["payback"] == "—"


def test_without_a_baseline_every_payback_is_unknown() -> None:
    rows = [{keys.MAKE_J: 1.0, keys.stage_j_per_sample("test"): 0.2}]
    assert math.isnan(payback.add_payback(rows, lambda r: False))
    assert math.isnan(rows[0][keys.PAYBACK_SAMPLES])


def test_fit_stage_keys() -> None:
    assert keys.fit_stage_keys("train") == {}
    assert keys.fit_stage_keys("recover") == {"energy/train_j": "energy/recover_j",
                                              "energy/j_per_sample": "energy/recover_j_per_sample"}


def test_compare_payback_column_on_groups_of_replicates() -> None:
    pd = pytest.importorskip("pandas")
    from wattlog.compare import _payback_cell, add_payback

    groups = pd.DataFrame({
        "run_name": ["none", "int8", "distill", "l1"],
        "is_baseline": [True, False, False, False],
        "test_j_per_sample": [0.30, 0.20, 0.15, 0.305],
        "test_j_per_sample_sd": [0.01, 0.01, 0.01, 0.01],
        "make_j": [0.0, 0.0, 300.0, math.nan],
        "make_j_sd": [0.0, 0.0, 30.0, math.nan],
    })
    add_payback(groups)
    assert math.isnan(groups["payback_samples"][0])
    assert groups["payback_samples"][1] == 0.0
    assert groups["payback_samples"][2] == pytest.approx(2000.0)
    assert groups["payback_samples_sd"][2] > 0
    assert groups["payback_samples"][3] == math.inf and groups["payback_in_noise"][3]  # 0.005 J: noise
    cells = [_payback_cell(r) for _, r in groups.iterrows()]
    assert cells[0] == "base" and cells[1] == "0" and cells[2].startswith("2.00k±") and cells[3] == "never~"


def test_compare_payback_needs_a_baseline() -> None:
    pd = pytest.importorskip("pandas")
    from wattlog.compare import add_payback
    from wattlog.errors import ConfigError

    with pytest.raises(ConfigError, match="baseline"):
        add_payback(pd.DataFrame({"is_baseline": [False], "test_j_per_sample": [0.1]}))


def test_a_fit_stage_cannot_take_an_evaluation_stages_name() -> None:
    pytest.importorskip("lightning")
    from wattlog import EnergyMonitor
    from wattlog.errors import ConfigError

    assert EnergyMonitor(fit_stage="recover", enabled=False).fit_stage == "recover"
    for bad in ("test", "val", "Recover", "re cover"):
        with pytest.raises(ConfigError, match="fit_stage"):
            EnergyMonitor(fit_stage=bad)
