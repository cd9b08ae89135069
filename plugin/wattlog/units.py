"""Plain unit conversions. No third-party imports."""

from __future__ import annotations

J_PER_KWH = 3.6e6
J_PER_WH = 3600.0
WORLD_AVERAGE_G_PER_KWH = 475.0
"""World-average grid carbon intensity used as the fallback (gCO2e/kWh)."""
RAM_W_PER_GB = 0.3725
"""Green Algorithms figure for DRAM power per GB of memory in use."""


def j_to_kwh(energy_j: float) -> float:
    """Joules to kilowatt-hours."""
    return energy_j / J_PER_KWH


def kwh_to_j(energy_kwh: float) -> float:
    """Kilowatt-hours to joules."""
    return energy_kwh * J_PER_KWH


def mj_to_j(energy_mj: float) -> float:
    """Millijoules (NVML's energy unit) to joules."""
    return energy_mj / 1e3


def uj_to_j(energy_uj: float) -> float:
    """Microjoules (powercap's energy unit) to joules."""
    return energy_uj / 1e6


def mw_to_w(power_mw: float) -> float:
    """Milliwatts (NVML's power unit) to watts."""
    return power_mw / 1e3


def emissions_g(energy_kwh: float, intensity_g_per_kwh: float, pue: float = 1.0) -> float:
    """Emissions in gCO2e: kWh x PUE x grid intensity."""
    return energy_kwh * pue * intensity_g_per_kwh
