"""wattlog.render: the one auto-scaling formatter behind every human-facing number."""

from __future__ import annotations

import math
import re

import pytest
from wattlog import render
from wattlog.render import (
    MINUS,
    choose_energy_unit,
    format_duration,
    format_emissions,
    format_energy,
    format_energy_spread,
    format_number,
    format_number_spread,
    format_percent,
    format_power,
    format_signed,
    progress_bar_text,
    significant,
)

# every decade from 1 nJ to 1 PJ, with awkward mantissas
SCALES = [m * 10.0**e for e in range(-9, 16) for m in (1.0, 1.2345, 4.999, 9.996)]


@pytest.mark.parametrize(
    ("joules", "unit", "text"),
    [
        (121.14, "J", "121 J"),
        (2.6477757252, "J", "2.65 J"),  # 7.35e-7 kWh: the run MLflow showed as 7.35493257…
        (0.0042, "J", "4.20 mJ"),
        (999.4, "J", "999 J"),
        (999.6, "J", "1.00 kJ"),  # rounding carries into the next prefix
        (1234.0, "J", "1.23 kJ"),
        (2.6e6, "J", "2.60 MJ"),
        (3600.0, "Wh", "1.00 Wh"),
        (2.6477757252, "Wh", "735 µWh"),
        (3.6e6, "Wh", "1.00 kWh"),
        (5.4e9, "Wh", "1.50 MWh"),
        (3.6e6, "kWh", "1.00 kWh"),
        (2.6477757252, "kWh", f"7.35e{MINUS}7 kWh"),  # a fixed unit: the whole exponent, never 0.000
        (1500.0, "kJ", "1.50 kJ"),
        (0.0, "J", "0 J"),
        (-3000.0, "J", f"{MINUS}3.00 kJ"),
        (math.nan, "J", "—"),
        (None, "J", "—"),
        (math.inf, "J", "—"),
    ],
)
def test_format_energy(joules: float | None, unit: str, text: str) -> None:
    assert format_energy(joules, unit) == text


@pytest.mark.parametrize("unit", ["J", "Wh"])
@pytest.mark.parametrize("joules", SCALES)
def test_energy_never_zero_and_mantissa_in_range(joules: float, unit: str) -> None:
    text = format_energy(joules, unit)
    number, _, name = text.partition(" ")
    assert name in render.ENERGY_UNITS
    assert float(number.replace(MINUS, "-")) != 0
    value = float(number)
    if joules * (1 if unit == "J" else 1 / 3600) >= 1e-12:  # above the smallest prefix (p)
        assert 1 <= value < 1000 or name in ("TJ", "TWh"), text
        assert len(text) <= 8, text
    # 3 significant figures, or an integer part
    assert len(number.replace(".", "").lstrip("0")) == 3 or value >= 1000, text
    assert format_energy(joules, unit).replace(name, "").strip() == number
    assert float(number) * render.ENERGY_UNITS[name] == pytest.approx(joules, rel=5e-3)


def test_fixed_unit_is_never_zero_for_a_nonzero_value() -> None:
    for joules in SCALES:
        text = format_energy(joules, "kWh")
        assert not re.fullmatch(r"0(\.0+)? kWh", text), text
        assert float(text.split()[0].replace(MINUS, "-")) * 3.6e6 == pytest.approx(joules, rel=5e-3)


def test_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unit='kwh' is not valid"):
        format_energy(1.0, "kwh")


@pytest.mark.parametrize(
    ("fn", "value", "text"),
    [
        (format_emissions, 0.85, "850 mgCO2e"),
        (format_emissions, 1.234, "1.23 gCO2e"),
        (format_emissions, 4560.0, "4.56 kgCO2e"),
        (format_emissions, 1.2e6, "1.20 tCO2e"),
        (format_power, 0.85, "850 mW"),
        (format_power, 212.3, "212 W"),
        (format_power, 1234.0, "1.23 kW"),
        (format_duration, 0.85, "850 ms"),
        (format_duration, 12.34, "12.3 s"),
        (format_duration, 245.0, "4m05s"),
        (format_duration, 3720.0, "1h02m"),
        (format_duration, 273600.0, "3d04h"),
        (format_percent, -62.3, f"{MINUS}62 %"),
        (format_percent, 6.43, "+6.4 %"),
        (format_percent, 0.43, "+0.43 %"),
        (format_percent, 0.0, "0 %"),
        (format_percent, -99.992, f"{MINUS}99.99 %"),
        (format_percent, -100.0, f"{MINUS}100 %"),
        (format_number, 0.8125, "0.8125"),
        (format_number, 0.81, "0.81"),
        (format_number, 123456.0, "123456"),
        (format_signed, -0.0117, f"{MINUS}0.0117"),
        (format_signed, 0.003, "+0.003"),
    ],
)
def test_other_quantities(fn, value: float, text: str) -> None:
    assert fn(value) == text


def test_significant_keeps_trailing_zeros_and_carries() -> None:
    assert significant(1.0) == "1.00"
    assert significant(9.996) == "10.0"
    assert significant(0.0001234) == "0.000123"
    assert significant(3.3e-7) == f"3.30e{MINUS}7"
    assert significant(1234.0) == "1234"


def test_spreads() -> None:
    assert format_energy_spread(12345.0, 432.0) == "12.3±0.4 kJ"
    assert format_energy_spread(12345.0, 4.3) == "12.345±0.004 kJ"
    assert format_energy_spread(120.0, None) == "120 J"
    assert format_number_spread(0.8125, 0.0043) == "0.812±0.004"
    assert format_number_spread(0.8125, 0.013) == "0.812±0.013"
    assert format_number_spread(0.8125, 0.0) == "0.8125"


def test_choose_energy_unit() -> None:
    assert choose_energy_unit([1.0, 3000.0, 12000.0]) == ("kJ", 1000.0)
    assert choose_energy_unit([7.2e6], "Wh") == ("kWh", 3.6e6)
    assert choose_energy_unit([1.0], "kWh") == ("kWh", 3.6e6)
    assert choose_energy_unit([]) == ("J", 1.0)


@pytest.mark.parametrize("power_w", [0.0, 0.004, 3.7, 212.0, 999.7, 12_345.0, 8e6])
@pytest.mark.parametrize("total_j", [0.0, 1e-6, 0.3, 7.35e-7 * 3.6e6, 1799.0, 1800.0, 4.5e5, 3.6e9, 1e15])
@pytest.mark.parametrize("unit", ["J", "Wh"])
def test_progress_bar_text_is_short_and_never_zero(power_w: float, total_j: float, unit: str) -> None:
    shown = progress_bar_text(power_w, total_j, unit)
    assert set(shown) == {"power", "energy"}
    for key, value in (("power", power_w), ("energy", total_j)):
        text = shown[key]
        assert len(text) <= 8, text
        assert "e" not in text.split()[0], text  # no exponent to cut
        if value:
            assert float(text.split()[0]) != 0, text
    assert progress_bar_text(None, math.nan) == {"power": "—", "energy": "—"}
