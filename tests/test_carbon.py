"""Carbon intensity lookup from codecarbon's offline data, emissions arithmetic, PUE."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from wattlog import carbon, units
from wattlog.carbon import CarbonIntensity, emissions_g, lookup_intensity, validate_pue
from wattlog.errors import ConfigError, WattlogWarning


def _data(relpath: str):
    """codecarbon's data file, parsed independently: the ground truth."""
    with open(carbon._codecarbon_dir() / "data/private_infra" / relpath, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def lenient(monkeypatch):
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setenv("WATTLOG_STRICT", "1")


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("country", ["FRA", "fra", "FR", "France"])
def test_country(country, no_warnings):
    fra = _data("global_energy_mix.json")["FRA"]
    got = lookup_intensity(country)
    assert got == CarbonIntensity(fra["carbon_intensity"], f"codecarbon:global_energy_mix:FRA:{fra['year']}")


def test_us_state_converted_from_lbs_per_mwh(no_warnings):
    ca = _data("2023/usa_emissions.json")["california"]
    expected_g_per_kwh = ca["emissions"] * 453.59237 / 1000  # lb -> g, per MWh -> per kWh
    for region in ("california", "California", "CA"):
        got = lookup_intensity("USA", region)
        assert got.g_per_kwh == pytest.approx(expected_g_per_kwh, rel=1e-12)
        assert got.source == "codecarbon:usa_emissions:2023:california"
    assert 150 < got.g_per_kwh < 250  # sanity: ~179 g/kWh, not lbs/MWh (~395)


def test_canadian_province_from_energy_mix(no_warnings):
    on = _data("2023/canada_energy_mix.json")["ontario"]
    fossil_g = on["coal"] * 995.725971 + on["petroleum"] * 816.6885263 + on["naturalGas"] * 743.8415916
    expected = fossil_g / on["total"]
    for region in ("ontario", "ON"):
        got = lookup_intensity("CAN", region)
        assert got.g_per_kwh == pytest.approx(expected, rel=1e-12)
        assert got.source == "codecarbon:canada_energy_mix:2023:ontario"


def test_nordic_zone(no_warnings):
    se3 = _data("nordic_emissions.json")["data"]["SE3"]
    expected = CarbonIntensity(se3["emission_factor"], f"codecarbon:nordic_emissions:{se3['year']}:SE3")
    assert lookup_intensity("SWE", "se3") == expected
    assert lookup_intensity("SE", "SE3") == expected
    assert lookup_intensity(None, "SE3") == expected  # bidding zones are unambiguous alone
    fi = _data("nordic_emissions.json")["data"]["FI"]
    assert lookup_intensity("FIN", "FI").g_per_kwh == fi["emission_factor"]


def test_chinese_province(no_warnings):
    bj = _data("2023/china_provincial_emissions.json")["data"]["CN-BJ"]
    assert lookup_intensity("CHN", "Beijing Municipality") == CarbonIntensity(
        bj["emission_factor"], "codecarbon:china_provincial_emissions:2023:CN-BJ"
    )


def test_no_country_is_world_average_silently(no_warnings):
    assert lookup_intensity() == CarbonIntensity(475.0, "default:world_average")
    assert lookup_intensity("  ") == CarbonIntensity(units.WORLD_AVERAGE_G_PER_KWH, "default:world_average")


def test_unknown_country_warns_once(lenient):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lookup_intensity("XXX")
    assert got == CarbonIntensity(475.0, "default:world_average (unknown country 'XXX')")
    assert [w.category for w in caught] == [WattlogWarning]
    assert "XXX" in str(caught[0].message)


def test_unknown_country_strict(strict):
    with pytest.raises(ConfigError) as info:
        lookup_intensity("Atlantis")
    assert info.value.field == "country" and info.value.value == "Atlantis"


def test_unknown_region_falls_back_to_country(lenient):
    dnk = _data("global_energy_mix.json")["DNK"]
    with pytest.warns(WattlogWarning, match="DK1"):
        got = lookup_intensity("DNK", "DK1")
    assert got.g_per_kwh == dnk["carbon_intensity"]
    assert got.source == f"codecarbon:global_energy_mix:DNK:{dnk['year']} (unknown region 'DK1')"


def test_unknown_region_strict(strict):
    with pytest.raises(ConfigError) as info:
        lookup_intensity("USA", "atlantis")
    assert info.value.field == "region"


def test_override_wins(no_warnings):
    assert lookup_intensity("XXX", "nowhere", override_g_per_kwh=12) == CarbonIntensity(12.0, "user")
    assert lookup_intensity(override_g_per_kwh=0.0) == CarbonIntensity(0.0, "user")


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "100", True])
def test_bad_override(bad):
    with pytest.raises(ConfigError) as info:
        lookup_intensity("FRA", override_g_per_kwh=bad)
    assert info.value.field == "carbon_intensity"


def test_emissions_arithmetic():
    assert emissions_g(2.0, 500.0) == 1000.0
    assert emissions_g(2.0, CarbonIntensity(500.0, "user"), pue=1.5) == 1500.0
    assert emissions_g(0.0, 475.0, pue=1.2) == 0.0
    assert math.isclose(emissions_g(units.j_to_kwh(3.6e6), 56.039), 56.039)


@pytest.mark.parametrize("pue", [1.0, 1, 1.58])
def test_valid_pue(pue):
    assert validate_pue(pue) == float(pue)


@pytest.mark.parametrize("pue", [0.9, 0, -1, float("nan"), float("inf"), "1.2", None, False])
def test_bad_pue(pue):
    with pytest.raises(ConfigError) as info:
        validate_pue(pue)
    assert info.value.field == "pue"
    with pytest.raises(ConfigError):
        emissions_g(1.0, 100.0, pue=pue)
