"""Energy sources and their auto-detection.

Each source module imports its vendor library lazily, so importing this package touches
no hardware. :func:`select_sources` probes the hardware (opening and closing each candidate)
and returns, for each of gpu, cpu and ram, the chosen source and the reason for the choice.

Fallback order: GPU: NVML (energy counter, else instant power, else 1-s averaged power) or
none. CPU: RAPL powercap, else TDP x utilisation estimate. RAM: RAPL DRAM domain (when the
CPU is read through RAPL and the platform exposes one), else the 0.3725 W/GB estimate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from wattlog.errors import ConfigError, SourceUnavailable
from wattlog.sources.base import Domain, EnergySource, PowerIntegrator, Reading

__all__ = [
    "Choice",
    "Domain",
    "EnergySource",
    "PowerIntegrator",
    "Reading",
    "select_sources",
    "validate_choices",
]

GPU_CHOICES = ("auto", "none")
CPU_CHOICES = ("auto", "rapl", "estimate", "none")
RAM_CHOICES = ("auto", "rapl", "estimate", "none")
DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"


@dataclass(frozen=True)
class Choice:
    """What will measure one kind of hardware, and why.

    Attributes:
        kind: ``gpu``, ``cpu`` or ``ram``.
        source: the (unstarted) source, or None when nothing measures this kind or another
            source covers it (RAPL's DRAM domain lives in the RAPL CPU source).
        method: ``counter``, ``power``, ``power_avg``, ``rapl``, ``estimate`` or ``none``.
        estimated: True when the figures are estimates rather than sensor readings.
        reason: a sentence a person can act on.
    """

    kind: str
    source: EnergySource | None
    method: str
    estimated: bool
    reason: str


def validate_choices(gpus: object, cpu: object, ram: object) -> None:
    """Raise ConfigError for a bad ``gpus``, ``cpu`` or ``ram`` argument."""
    if isinstance(gpus, str):
        if gpus not in GPU_CHOICES:
            raise ConfigError("gpus", gpus, "'auto', 'none' or a list of CUDA device indices")
    elif not (
        isinstance(gpus, Sequence)
        and not isinstance(gpus, (bytes, bytearray))
        and len(gpus) > 0
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in gpus)
        and len(set(gpus)) == len(gpus)
    ):
        allowed = "'auto', 'none' or a non-empty list of distinct CUDA device indices >= 0"
        raise ConfigError("gpus", gpus, allowed)
    if cpu not in CPU_CHOICES:
        raise ConfigError("cpu", cpu, CPU_CHOICES)
    if ram not in RAM_CHOICES:
        raise ConfigError("ram", ram, RAM_CHOICES)


def _probe(source: EnergySource) -> list[Domain]:
    try:
        return source.start()
    finally:
        source.close()


def _select_gpu(gpus: str | Sequence[int], require_counter: bool) -> Choice:
    if gpus == "none":
        return Choice("gpu", None, "none", False, "disabled (gpus='none')")
    from wattlog.sources.nvml import NvmlGpu

    source = NvmlGpu(cuda_devices=None if gpus == "auto" else list(gpus), require_counter=require_counter)
    try:
        domains = _probe(source)
    except SourceUnavailable as exc:
        if gpus == "auto" and not require_counter:
            return Choice("gpu", None, "none", False, f"no GPU measured: {exc}")
        raise
    if not domains:
        return Choice("gpu", None, "none", False, "NVML found no GPU")
    methods = sorted({d.method for d in domains})
    method = ",".join(methods)
    why = {
        "counter": "NVML total-energy counter",
        "power": "integrated NVML instant power",
        "power_avg": "integrated NVML 1-s averaged power (no energy counter or instant field)",
    }
    reason = f"{len(domains)} GPU(s): " + "; ".join(why.get(m, m) for m in methods)
    return Choice("gpu", source, method, False, reason)


def _select_cpu_ram(cpu: str, ram: str, powercap_root: str, cpu_scope: str, ram_scope: str) -> list[Choice]:
    from wattlog.sources.estimate import EstimatedCpu, EstimatedRam
    from wattlog.sources.rapl import Rapl

    choices: list[Choice] = []
    rapl_domains: list[Domain] = []
    rapl_reason = ""
    rapl: Rapl | None = None
    if cpu in ("auto", "rapl") or ram == "rapl":
        rapl = Rapl(root=powercap_root, include_dram=ram in ("auto", "rapl"))
        try:
            rapl_domains = _probe(rapl)
        except SourceUnavailable as exc:
            if cpu == "rapl" or ram == "rapl":
                raise
            rapl_reason = str(exc)
            rapl = None
    has_dram = any(d.kind == "ram" for d in rapl_domains)
    if ram == "rapl" and not has_dram:
        raise SourceUnavailable(f"ram='rapl' but RAPL at {powercap_root} exposes no dram domain")

    if cpu in ("auto", "rapl") and rapl is not None:
        packages = sum(1 for d in rapl_domains if d.kind == "cpu")
        choices.append(Choice("cpu", rapl, "rapl", False, f"RAPL powercap, {packages} package domain(s)"))
    elif cpu in ("auto", "estimate"):
        why = "requested" if cpu == "estimate" else f"RAPL not readable ({rapl_reason})"
        choices.append(Choice("cpu", EstimatedCpu(scope=cpu_scope), "estimate", True, f"TDP x utilisation; {why}"))
    else:
        choices.append(Choice("cpu", None, "none", False, "disabled (cpu='none')"))

    if ram in ("auto", "rapl") and has_dram and choices[0].method == "rapl":
        choices.append(Choice("ram", None, "rapl", False, "RAPL dram domain (read by the RAPL CPU source)"))
    elif ram == "rapl":
        raise ConfigError("ram", ram, "'rapl' only together with cpu='auto' or cpu='rapl' (one RAPL source)")
    elif ram in ("auto", "estimate"):
        why = "requested" if ram == "estimate" else "no readable RAPL dram domain"
        choices.append(
            Choice("ram", EstimatedRam(scope=ram_scope), "estimate", True, f"0.3725 W/GB of memory in use; {why}")
        )
    else:
        choices.append(Choice("ram", None, "none", False, "disabled (ram='none')"))
    return choices


def select_sources(
    gpus: str | Sequence[int] = "auto",
    cpu: str = "auto",
    ram: str = "auto",
    *,
    require_gpu_counter: bool = False,
    powercap_root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT,
    cpu_scope: str = "system",
    ram_scope: str = "process",
) -> list[Choice]:
    """Probe the hardware and choose a source for each of gpu, cpu and ram.

    Args:
        gpus: ``auto`` (every visible GPU, none if NVML is unavailable), ``none``, or CUDA
            device indices (mapped to NVML by UUID, honouring ``CUDA_VISIBLE_DEVICES``).
        cpu: ``auto`` (RAPL, else estimate), ``rapl`` (required), ``estimate`` or ``none``.
        ram: ``auto`` (RAPL dram, else estimate), ``rapl`` (required), ``estimate`` or ``none``.
        require_gpu_counter: fail unless every GPU has NVML's energy counter.
        powercap_root: where the powercap tree lives (tests pass a fake tree).
        cpu_scope, ram_scope: ``system`` or ``process`` for the estimates.

    Returns:
        Three choices, gpu, cpu and ram, in that order.

    Raises:
        ConfigError: a bad argument.
        SourceUnavailable: an explicitly requested source cannot measure here.
    """
    validate_choices(gpus, cpu, ram)
    if not isinstance(powercap_root, (str, os.PathLike)) or not os.fspath(powercap_root):
        allowed = "a path to the powercap sysfs tree, e.g. /sys/class/powercap"
        raise ConfigError("powercap_root", powercap_root, allowed)
    return [_select_gpu(gpus, require_gpu_counter)] + _select_cpu_ram(
        cpu, ram, os.fspath(powercap_root), cpu_scope, ram_scope
    )
