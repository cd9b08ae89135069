"""Grid carbon intensity (gCO2e/kWh) and emissions = kWh x PUE x intensity.

Intensities come from codecarbon's offline data, read as plain JSON (codecarbon itself is
never imported), and are converted the way ``codecarbon.core.emissions`` converts them:

* countries: ``private_infra/global_energy_mix.json``, field ``carbon_intensity`` (gCO2e/kWh;
  computed from the generation mix and ``carbon_intensity_per_source.json`` when absent);
* US states: ``private_infra/<year>/usa_emissions.json``, EPA eGRID rates in lbs/MWh;
  1 lb/MWh = 0.45359237 kg / 1000 kWh = 0.45359237 g/kWh;
* Canadian provinces: ``private_infra/<year>/canada_energy_mix.json``, a generation mix in
  percent; only coal, petroleum and natural gas emit (995.7, 816.7, 743.8 gCO2e/kWh, the
  energy-usage factors codecarbon uses), everything else counts 0;
* Nordic bidding zones (SE1-SE4, NO1-NO5, FI): ``private_infra/nordic_emissions.json``;
* Chinese provinces: ``private_infra/<year>/china_provincial_emissions.json``.

The data year goes into the source string, e.g. ``codecarbon:global_energy_mix:FRA:2023``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattlog import units
from wattlog.errors import ConfigError, WattlogWarning, strict_mode

LBS_PER_MWH_TO_G_PER_KWH = 0.45359237
"""g/kWh per lb/MWh (one pound is 0.45359237 kg; kg/MWh = g/kWh)."""
_FOSSIL_G_PER_KWH = {"coal": 995.725971, "petroleum": 816.6885263, "naturalGas": 743.8415916}
"""codecarbon's factors for regional energy mixes (energy-usage project)."""
_NORDIC_ZONES = {"SWE": "SE", "NOR": "NO", "FIN": "FI"}
_CANADA_CODES = {
    "AB": "alberta", "BC": "british columbia", "MB": "manitoba", "NB": "new brunswick",
    "NL": "newfoundland and labrador", "NS": "nova scotia", "NT": "northwest territories",
    "NU": "nunavut", "ON": "ontario", "PE": "prince edward island", "QC": "quebec",
    "SK": "saskatchewan", "YT": "yukon",
}  # fmt: skip
_COUNTRY_ALIASES = {"UK": "GBR", "EL": "GRC"}
"""Two-letter codes in common use that are not ISO 3166 alpha-2 (EU usage)."""
_CHINA_SUFFIX = re.compile(r"\s+(autonomous region|municipality|province|sheng|shi|zizhiqu)$")
_PRIVATE_INFRA = Path("data/private_infra")


@dataclass(frozen=True)
class CarbonIntensity:
    """A grid carbon intensity and where it came from.

    Attributes:
        g_per_kwh: gCO2e per kWh.
        source: provenance, e.g. ``codecarbon:global_energy_mix:FRA:2023``,
            ``codecarbon:usa_emissions:2023:california``, ``user``, ``default:world_average``.
    """

    g_per_kwh: float
    source: str


class _DataMissing(Exception):
    """codecarbon's data file is not there."""


def _codecarbon_dir() -> Path:
    spec = importlib.util.find_spec("codecarbon")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise _DataMissing("the codecarbon package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=None)
def _load_json(relpath: str) -> Any:
    """Parsed codecarbon data file (cached; callers must not mutate it)."""
    path = _codecarbon_dir() / relpath
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise _DataMissing(f"codecarbon data file {path} not found") from exc


@functools.lru_cache(maxsize=None)
def _regional_file(filename: str) -> tuple[str, str]:
    """(relative path, year) of the newest ``private_infra/<year>/<filename>``, else the flat one."""
    base = _codecarbon_dir() / _PRIVATE_INFRA
    years: list[str] = []
    if base.is_dir():
        years = sorted((p.name for p in base.iterdir() if p.name.isdigit() and (p / filename).is_file()), key=int)
    if years:
        return str(_PRIVATE_INFRA / years[-1] / filename), years[-1]
    return str(_PRIVATE_INFRA / filename), ""


def _tag(*parts: object) -> str:
    return ":".join(str(p) for p in parts if p not in (None, ""))


def _resolve_country(country: str, energy_mix: dict[str, Any]) -> str | None:
    """ISO 3166 alpha-3 code in ``energy_mix`` for an alpha-3 or alpha-2 code or a name."""
    text = country.strip()
    upper = text.upper()
    if upper in energy_mix:
        return upper
    if upper in _COUNTRY_ALIASES:
        return _COUNTRY_ALIASES[upper]
    folded = text.casefold()
    for iso3, row in energy_mix.items():
        if str(row.get("country_name", "")).casefold() == folded:
            return iso3
    try:
        import pycountry  # a codecarbon dependency; optional here
    except ImportError:
        return None
    try:
        if len(upper) == 2:
            found = pycountry.countries.get(alpha_2=upper)
        else:
            found = pycountry.countries.lookup(text)
    except LookupError:
        found = None
    iso3 = getattr(found, "alpha_3", None)
    return iso3 if iso3 in energy_mix else None


def _country_intensity(iso3: str, row: dict[str, Any]) -> CarbonIntensity:
    """Intensity of one global_energy_mix.json row (codecarbon's ``_global_energy_mix_to_emissions_rate``)."""
    source = _tag("codecarbon:global_energy_mix", iso3, row.get("year"))
    if row.get("carbon_intensity") is not None:
        return CarbonIntensity(float(row["carbon_intensity"]), source)
    factors = _load_json(str(_PRIVATE_INFRA / "carbon_intensity_per_source.json"))
    total_twh = float(row.get("total_TWh") or 0.0)
    g_per_kwh = summed_twh = 0.0
    for key, twh in row.items():
        factor = factors.get(key[: -len("_TWh")]) if key.endswith("_TWh") else None
        if factor is not None and total_twh > 0:
            g_per_kwh += float(twh) / total_twh * float(factor)
            summed_twh += float(twh)
    if total_twh <= 0 or not math.isclose(summed_twh, total_twh, rel_tol=1e-6):
        return CarbonIntensity(units.WORLD_AVERAGE_G_PER_KWH, f"default:world_average (no mix for {iso3})")
    return CarbonIntensity(g_per_kwh, source + ":mix")


def _region_intensity(iso3: str, region: str) -> CarbonIntensity | None:
    """Regional intensity for USA, CAN, CHN and the Nordic zones; None if not known."""
    key = region.strip()
    if iso3 in _NORDIC_ZONES:
        zones = _load_json(str(_PRIVATE_INFRA / "nordic_emissions.json"))["data"]
        zone = key.upper()
        if zone.startswith(_NORDIC_ZONES[iso3]) and zone in zones:
            row = zones[zone]
            return CarbonIntensity(
                float(row["emission_factor"]), _tag("codecarbon:nordic_emissions", row.get("year"), zone)
            )
        return None
    if iso3 == "USA":
        relpath, year = _regional_file("usa_emissions.json")
        states = _load_json(relpath)
        year = str(states.get("_source", {}).get("year", year))
        for name, row in states.items():
            if name.startswith("_") or not isinstance(row, dict):
                continue
            if name.casefold() == key.casefold() or str(row.get("regionCode", "")).upper() == key.upper():
                g_per_kwh = float(row["emissions"]) * LBS_PER_MWH_TO_G_PER_KWH
                return CarbonIntensity(g_per_kwh, _tag("codecarbon:usa_emissions", year, name))
        return None
    if iso3 == "CAN":
        relpath, year = _regional_file("canada_energy_mix.json")
        provinces = _load_json(relpath)
        name = _CANADA_CODES.get(key.upper(), key.casefold())
        row = provinces.get(name)
        if row is None:
            return None
        total = float(row["total"])
        g_per_kwh = sum(float(row.get(src, 0.0)) / total * f for src, f in _FOSSIL_G_PER_KWH.items())
        return CarbonIntensity(g_per_kwh, _tag("codecarbon:canada_energy_mix", year, name))
    if iso3 == "CHN":
        relpath, _year = _regional_file("china_provincial_emissions.json")
        provinces = _load_json(relpath)["data"]
        wanted = _CHINA_SUFFIX.sub("", " ".join(key.casefold().split()))
        for code, row in provinces.items():
            if code.upper() == key.upper() or wanted in row.get("names", ()):
                return CarbonIntensity(
                    float(row["emission_factor"]),
                    _tag("codecarbon:china_provincial_emissions", row.get("year"), code),
                )
        return None
    return None


def _region_without_country(region: str) -> CarbonIntensity | None:
    """A region given alone: a Nordic zone, a US state or a Canadian province by name."""
    zone = region.strip().upper()
    for iso3, prefix in _NORDIC_ZONES.items():
        if zone.startswith(prefix):
            found = _region_intensity(iso3, region)
            if found is not None:
                return found
    for iso3 in ("USA", "CAN"):
        if len(zone) > 2:  # two-letter codes are ambiguous (CA: California or Canada)
            found = _region_intensity(iso3, region)
            if found is not None:
                return found
    return None


def _fallback(field: str, value: str, allowed: str, why: str) -> CarbonIntensity:
    """World average with a warning; ConfigError naming ``field`` under WATTLOG_STRICT=1."""
    if strict_mode():
        raise ConfigError(field, value, allowed)
    warnings.warn(
        f"wattlog: {why}; using the world average {units.WORLD_AVERAGE_G_PER_KWH:g} gCO2e/kWh",
        WattlogWarning,
        stacklevel=3,
    )
    return CarbonIntensity(units.WORLD_AVERAGE_G_PER_KWH, f"default:world_average ({why})")


def validate_intensity(g_per_kwh: object) -> float:
    """``g_per_kwh`` as a float; ConfigError ``carbon_intensity`` unless finite and >= 0."""
    if (
        isinstance(g_per_kwh, bool)
        or not isinstance(g_per_kwh, (int, float))
        or not math.isfinite(g_per_kwh)
        or g_per_kwh < 0
    ):
        raise ConfigError("carbon_intensity", g_per_kwh, "a finite number of gCO2e/kWh >= 0")
    return float(g_per_kwh)


def lookup_intensity(
    country: str | None = None, region: str | None = None, override_g_per_kwh: float | None = None
) -> CarbonIntensity:
    """The grid carbon intensity for a place, or the user's value.

    Args:
        country: ISO 3166 alpha-3 (``FRA``) or alpha-2 (``FR``) code, or an English country
            name. None: the world average, silently.
        region: US state (``california`` or ``CA``), Canadian province (``ontario`` or ``ON``),
            Nordic bidding zone (``SE3``; valid alone too) or Chinese province (``beijing``).
            An unknown region falls back to the country.
        override_g_per_kwh: the user's intensity; wins over everything (source ``user``).

    Returns:
        The intensity and its source string.

    Raises:
        ConfigError: bad override (field ``carbon_intensity``); under ``WATTLOG_STRICT=1`` also
            an unknown ``country`` or ``region`` (otherwise one WattlogWarning and the world
            average, or the country's value for an unknown region).
    """
    if override_g_per_kwh is not None:
        return CarbonIntensity(validate_intensity(override_g_per_kwh), "user")
    country = country.strip() if isinstance(country, str) and country.strip() else None
    region = region.strip() if isinstance(region, str) and region.strip() else None
    allowed_country = "an ISO 3166 alpha-3/alpha-2 code or English name in codecarbon's energy mix data"
    allowed_region = "a US state, Canadian province, Nordic zone (SE1-SE4, NO1-NO5, FI) or Chinese province"
    try:
        if country is None:
            if region is None:
                return CarbonIntensity(units.WORLD_AVERAGE_G_PER_KWH, "default:world_average")
            found = _region_without_country(region)
            if found is not None:
                return found
            return _fallback("region", region, allowed_region, f"unknown region {region!r} without a country")
        energy_mix = _load_json(str(_PRIVATE_INFRA / "global_energy_mix.json"))
        iso3 = _resolve_country(country, energy_mix)
        if iso3 is None:
            return _fallback("country", country, allowed_country, f"unknown country {country!r}")
        if region is not None:
            found = _region_intensity(iso3, region)
            if found is not None:
                return found
            if strict_mode():
                raise ConfigError("region", region, f"{allowed_region}, for country {iso3}")
            warnings.warn(
                f"wattlog: no data for region {region!r} of {iso3}; using the country's intensity",
                WattlogWarning,
                stacklevel=2,
            )
            base = _country_intensity(iso3, energy_mix[iso3])
            return CarbonIntensity(base.g_per_kwh, f"{base.source} (unknown region {region!r})")
        return _country_intensity(iso3, energy_mix[iso3])
    except _DataMissing as exc:
        return _fallback("country", country or "", "installed codecarbon data", f"no carbon data: {exc}")


def validate_pue(pue: object) -> float:
    """``pue`` as a float; ConfigError ``pue`` unless finite and >= 1.0."""
    if isinstance(pue, bool) or not isinstance(pue, (int, float)) or not math.isfinite(pue) or pue < 1.0:
        raise ConfigError("pue", pue, "a finite number >= 1.0 (1.0: no datacenter overhead)")
    return float(pue)


def emissions_g(energy_kwh: float, intensity: CarbonIntensity | float, pue: float = 1.0) -> float:
    """Emissions in gCO2e: ``energy_kwh`` x ``pue`` x intensity (gCO2e/kWh).

    Raises:
        ConfigError: bad ``pue`` or intensity.
    """
    g_per_kwh = intensity.g_per_kwh if isinstance(intensity, CarbonIntensity) else intensity
    return units.emissions_g(energy_kwh, validate_intensity(g_per_kwh), validate_pue(pue))
