"""Numbers people read: one auto-scaling formatter for every human-facing output.

MLflow always gets SI base units (joules, watts, grams CO2e, seconds; see :mod:`wattlog.keys`).
Everything a person reads (``wattlog compare``, ``wattlog report``, the charts, the progress bar)
goes through this module, so that:

- a value is shown with 3 significant figures and a unit prefix that puts the mantissa in 1-999
  (``12.3 kJ``, ``4.17 Wh``, ``850 mgCO2e``);
- a non-zero value is never shown as ``0.000`` and an exponent is never cut: every string is
  complete and short (at most 8 characters for one energy or power value);
- a missing or non-finite value is ``—``.

Energy is shown in one of two families, chosen per context with ``unit=``: ``"J"`` (mJ, J, kJ,
MJ, GJ, ...) or ``"Wh"`` (mWh, Wh, kWh, MWh, ...). A prefixed unit (``"kWh"``, ``"kJ"``, ...)
fixes the unit instead. No third-party imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MINUS = "\u2212"
"""The typographic minus sign used in signed human output."""
MISSING = "—"
"""What a missing or non-finite value is shown as."""

_PREFIXES: list[tuple[str, float]] = [
    ("p", 1e-12),
    ("n", 1e-9),
    ("µ", 1e-6),
    ("m", 1e-3),
    ("", 1.0),
    ("k", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("T", 1e12),
]

J_PER_WH = 3600.0

ENERGY_FAMILIES = ("J", "Wh")
ENERGY_UNITS: dict[str, float] = {
    **{f"{p}J": f for p, f in _PREFIXES},
    **{f"{p}Wh": f * J_PER_WH for p, f in _PREFIXES},
}
"""Every energy unit name -> joules per unit."""


def is_number(value: object) -> bool:
    """True for a finite number or numeric string (``"1.5"``, from a CSV); False for bools and None."""
    if isinstance(value, bool) or value is None:
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _decimals(x: float, sig: int) -> int:
    """Decimals that give ``x`` ``sig`` significant figures (0 for large numbers)."""
    if x == 0:
        return 0
    return max(0, sig - 1 - math.floor(math.log10(abs(x))))


def significant(x: float, sig: int = 3) -> str:
    """``x`` with ``sig`` significant figures in plain notation, trailing zeros kept.

    ``1234`` -> ``1234`` (integers are never cut), ``12.34`` -> ``12.3``, ``1`` -> ``1.00``,
    ``0.0001234`` -> ``0.000123``. Below 1e-4 scientific notation is used (``1.23e-7``), with
    the whole exponent. Negative numbers use the typographic minus.
    """
    if not is_number(x):
        return MISSING
    x = float(x)
    if x == 0:
        return "0"
    sign = MINUS if x < 0 else ""
    ax = abs(x)
    if ax < 1e-4:
        mantissa, exp = f"{ax:.{sig - 1}e}".split("e")
        return (
            f"{sign}{mantissa}e{MINUS}{int(exp[1:])}"
            if exp.startswith("-")
            else f"{sign}{mantissa}e{int(exp)}"
        )
    d = _decimals(ax, sig)
    text = f"{ax:.{d}f}"
    if _decimals(float(text), sig) < d:  # rounding carried into a new digit: 9.996 -> 10.00 -> 10.0
        text = f"{ax:.{_decimals(float(text), sig)}f}"
    return sign + text


def _scaled(value: float, prefixes: list[tuple[str, float]], sig: int) -> tuple[str, str]:
    """Mantissa text and prefix with the mantissa in 1-999 after rounding to ``sig`` figures."""
    ax = abs(value)
    chosen = prefixes[0]
    for p in prefixes:
        if ax >= p[1]:
            chosen = p
    mantissa = ax / chosen[1]
    text = significant(mantissa, sig)
    idx = prefixes.index(chosen)
    if round(mantissa, _decimals(mantissa, sig)) >= 1000 and idx + 1 < len(prefixes):  # 999.6 J -> 1.00 kJ
        chosen = prefixes[idx + 1]
        text = significant(ax / chosen[1], sig)
    return (MINUS if value < 0 else "") + text, chosen[0]


def energy_unit(unit: str) -> tuple[str | None, float]:
    """``(family, joules per unit)``: family ``"J"``/``"Wh"`` auto-scales (factor 1), else fixed.

    Raises:
        ValueError: an unknown unit name.
    """
    if unit in ENERGY_FAMILIES:
        return unit, 1.0
    if unit in ENERGY_UNITS:
        return None, ENERGY_UNITS[unit]
    allowed = ", ".join([*ENERGY_FAMILIES, *ENERGY_UNITS])
    raise ValueError(f"unit={unit!r} is not valid; allowed: {allowed}")


def format_energy(joules: float | None, unit: str = "J", *, sig: int = 3, space: bool = True) -> str:
    """Energy given in joules, e.g. ``12.3 kJ`` (``unit="J"``) or ``3.42 Wh`` (``unit="Wh"``).

    Args:
        joules: the energy; None/NaN/inf give ``—``.
        unit: ``"J"`` or ``"Wh"`` to auto-scale within that family, or a unit such as
            ``"kWh"``/``"kJ"`` to fix it.
        sig: significant figures.
        space: a space between number and unit.

    Raises:
        ValueError: an unknown unit.
    """
    family, factor = energy_unit(unit)
    if not is_number(joules):
        return MISSING
    value = float(joules)  # type: ignore[arg-type]
    sep = " " if space else ""
    if value == 0:
        return f"0{sep}{family or unit}"
    if family is None:
        return f"{significant(value / factor, sig)}{sep}{unit}"
    base = J_PER_WH if family == "Wh" else 1.0
    text, prefix = _scaled(value / base, _PREFIXES, sig)
    return f"{text}{sep}{prefix}{family}"


def choose_energy_unit(values_j: Iterable[float | None], unit: str = "J") -> tuple[str, float]:
    """One unit for a set of energies (a chart axis, a column): ``(name, joules per unit)``.

    The largest finite magnitude gets a mantissa in 1-999; a fixed ``unit`` is returned as is.
    """
    family, factor = energy_unit(unit)
    if family is None:
        return unit, factor
    base = J_PER_WH if family == "Wh" else 1.0
    finite = [abs(float(v)) for v in values_j if is_number(v) and float(v) != 0]  # type: ignore[arg-type]
    top = max(finite, default=base) / base
    chosen = _PREFIXES[0]
    for p in _PREFIXES:
        if top >= p[1]:
            chosen = p
    return f"{chosen[0]}{family}", chosen[1] * base


def format_emissions(grams: float | None, *, sig: int = 3, space: bool = True) -> str:
    """Emissions given in grams CO2e: ``850 mgCO2e``, ``1.23 gCO2e``, ``4.56 kgCO2e``, ``1.20 tCO2e``."""
    if not is_number(grams):
        return MISSING
    value = float(grams)  # type: ignore[arg-type]
    sep = " " if space else ""
    if value == 0:
        return f"0{sep}gCO2e"
    prefixes = [("µg", 1e-6), ("mg", 1e-3), ("g", 1.0), ("kg", 1e3), ("t", 1e6), ("kt", 1e9)]
    text, prefix = _scaled(value, prefixes, sig)
    return f"{text}{sep}{prefix}CO2e"


def format_power(watts: float | None, *, sig: int = 3, space: bool = True) -> str:
    """Power given in watts: ``850 mW``, ``12.3 W``, ``1.23 kW``."""
    if not is_number(watts):
        return MISSING
    value = float(watts)  # type: ignore[arg-type]
    sep = " " if space else ""
    if value == 0:
        return f"0{sep}W"
    text, prefix = _scaled(value, _PREFIXES, sig)
    return f"{text}{sep}{prefix}W"


def format_duration(seconds: float | None) -> str:
    """A duration, at most 8 characters: ``850 ms``, ``12.3 s``, ``4m05s``, ``1h02m``, ``3d04h``."""
    if not is_number(seconds):
        return MISSING
    s = float(seconds)  # type: ignore[arg-type]
    sign = MINUS if s < 0 else ""
    s = abs(s)
    if s == 0:
        return "0 s"
    if s < 1:
        text, prefix = _scaled(s, _PREFIXES[:4], 3)
        return f"{sign}{text} {prefix}s"
    if s < 59.95:
        return f"{sign}{significant(s, 3)} s"
    total = round(s)
    if total < 3600:
        return f"{sign}{total // 60}m{total % 60:02d}s"
    minutes = round(s / 60)
    if minutes < 24 * 60:
        return f"{sign}{minutes // 60}h{minutes % 60:02d}m"
    hours = round(s / 3600)
    return f"{sign}{hours // 24}d{hours % 24:02d}h"


def format_number(x: float | None, sig: int = 4) -> str:
    """A plain number (a metric value): ``sig`` significant figures, trailing zeros dropped.

    ``0.8125`` -> ``0.8125``, ``0.81`` -> ``0.81``, ``123456`` -> ``123456``, ``3e-7`` -> ``3.000e−7``.
    """
    if not is_number(x):
        return MISSING
    x = float(x)  # type: ignore[arg-type]
    if x == 0:
        return "0"
    sign = MINUS if x < 0 else ""
    ax = abs(x)
    if ax < 1e-4:
        return significant(x, sig)
    if ax >= 10**sig:
        if ax < 1e15:
            return sign + str(round(ax))
        mantissa, exp = f"{ax:.{sig - 1}e}".split("e")
        return f"{sign}{mantissa}e{int(exp)}"
    text = f"{ax:.{_decimals(ax, sig)}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return sign + text


def format_signed(x: float | None, sig: int = 3) -> str:
    """A signed number (a metric delta): ``+0.0123``, ``−0.012``, ``0``."""
    if not is_number(x):
        return MISSING
    x = float(x)  # type: ignore[arg-type]
    if x == 0:
        return "0"
    return ("+" if x > 0 else "") + format_number(x, sig)


def format_percent(pct: float | None, *, signed: bool = True) -> str:
    """A percentage with 2 significant figures, at least whole percent: ``−62 %``, ``+6.4 %``, ``+0.43 %``."""
    if not is_number(pct):
        return MISSING
    p = float(pct)  # type: ignore[arg-type]
    if p == 0:
        return "0 %"
    ap = abs(p)
    text = f"{ap:.0f}" if ap >= 9.95 else significant(ap, 2)
    digits = 0
    while ap < 100 and float(text) >= 100 and digits < 4:  # -99.992 % is not -100 %
        digits += 1
        text = f"{ap:.{digits}f}"
    sign = (MINUS if p < 0 else "+") if signed else (MINUS if p < 0 else "")
    return f"{sign}{text} %"


def format_spread(mean: float | None, spread: float | None, *, sig: int = 3) -> tuple[str, str, float]:
    """Mean and spread as two numbers at the same decimal place, for ``mean±spread``.

    The spread gets 1 significant figure (2 when it starts with 1); the mean is rounded to the same
    decimal place, but gets at least ``sig`` significant figures and at most ``sig + 2``.

    Returns:
        ``(mean text, spread text, scale)`` where scale is 1 (the caller adds units).
    """
    if not is_number(mean):
        return MISSING, "", 1.0
    m = float(mean)  # type: ignore[arg-type]
    if not is_number(spread) or float(spread) == 0:  # type: ignore[arg-type]
        return significant(m, sig), "", 1.0
    s = abs(float(spread))  # type: ignore[arg-type]
    s_sig = 2 if f"{s:e}".startswith("1") else 1
    d_s = _decimals(s, s_sig)
    d_m = _decimals(m, sig) if m != 0 else d_s
    d = min(max(d_s, d_m), d_m + 2) if m != 0 else d_s
    d = max(d, 0)
    m_text = f"{abs(m):.{d}f}"
    s_text = f"{s:.{d}f}"
    if float(s_text) == 0:
        s_text = f"{s:.{d_s}f}"
    return (MINUS if m < 0 else "") + m_text, s_text, 1.0


def format_energy_spread(mean_j: float | None, spread_j: float | None, unit: str = "J") -> str:
    """``12.3±0.4 kJ``: a group mean and its spread in one unit (auto-scaled from the mean)."""
    if not is_number(mean_j):
        return MISSING
    if not is_number(spread_j) or float(spread_j) == 0:  # type: ignore[arg-type]
        return format_energy(mean_j, unit)
    name, factor = choose_energy_unit([mean_j], unit)
    m_text, s_text, _ = format_spread(float(mean_j) / factor, float(spread_j) / factor)  # type: ignore[arg-type]
    return f"{m_text}±{s_text} {name}"


def format_number_spread(mean: float | None, spread: float | None, sig: int = 3) -> str:
    """``0.812±0.004``: a group mean of a plain number and its spread."""
    if not is_number(mean):
        return MISSING
    if not is_number(spread) or float(spread) == 0:  # type: ignore[arg-type]
        return format_number(mean, sig + 1)
    m_text, s_text, _ = format_spread(mean, spread, sig=sig)
    return f"{m_text}±{s_text}"


def progress_bar_text(power_w: float | None, total_j: float | None, unit: str = "J") -> dict[str, str]:
    """What a progress bar shows: ``{"power": "212 W", "energy": "4.56 kJ"}``.

    Each value is at most 8 characters at every scale (never ``0.000``, never a cut exponent),
    so it survives TQDM and Rich bars at 100 columns. Show them as strings (e.g. through the
    progress bar's ``get_metrics``), not as floats that the bar formats itself.

    Args:
        power_w: the latest mean power (W).
        total_j: the run's cumulative energy (J).
        unit: ``"J"`` or ``"Wh"`` family, or a fixed energy unit.
    """
    return {"power": format_power(power_w), "energy": format_energy(total_j, unit)}
