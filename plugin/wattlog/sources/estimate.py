"""Estimated CPU and RAM energy, for machines without a readable energy counter.

Both sources are labelled ``estimated`` (``Domain.estimated=True``, method ``estimate``).

* CPU: power = TDP x utilisation (codecarbon's model, without its 10 % idle floor). The TDP
  comes from codecarbon's offline table ``data/hardware/cpu_power.csv`` matched on the CPU
  model name, times the number of sockets; otherwise ``DEFAULT_TDP_W_PER_THREAD`` per logical
  CPU.
* RAM: power = ``units.RAM_W_PER_GB`` (0.3725 W, the Green Algorithms figure) per GiB of
  memory in use, not per installed DIMM.

Power is sampled at most every ``update_interval_s`` and held constant until the next
update; the held value is integrated as a step function, so ``read()`` costs one clock read
and a multiplication at the sampler's 20-50 ms cadence. The CPU utilisation of an update is
the mean over the previous update interval, so the CPU power trace lags the load by at most
one ``update_interval_s``; the first interval after ``start()`` counts as idle.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import os
import platform
import re
from pathlib import Path

from wattlog import helper_processes, units
from wattlog.errors import ConfigError, SourceError, SourceUnavailable
from wattlog.sources.base import Domain, EnergySource, Reading

DEFAULT_TDP_W_PER_THREAD = 4.0
"""Whole-machine CPU power at full load per logical CPU, when the model is not in the table.

Same constant as codecarbon (``DEFAULT_POWER_PER_CORE = 4`` W per thread), so wattlog and
codecarbon agree on unknown CPUs. It is also in line with current server parts: a 64-thread
EPYC 7543 is rated 225 W (3.5 W/thread), a 112-thread Xeon Platinum 8480+ 350 W (3.1 W/thread),
a 32-thread Ryzen 9 5950X 105 W (3.3 W/thread).
"""

SCOPES = ("system", "process")
_CPUINFO_PATH = "/proc/cpuinfo"
_CPU_POWER_CSV = "data/hardware/cpu_power.csv"


def cpu_model_name(cpuinfo_path: str | os.PathLike = _CPUINFO_PATH) -> str:
    """The CPU model name: ``model name`` from /proc/cpuinfo, else ``platform.processor()``.

    Returns ``"unknown"`` when neither says anything.
    """
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor().strip() or platform.machine().strip() or "unknown"


def cpu_socket_count(cpuinfo_path: str | os.PathLike = _CPUINFO_PATH) -> int:
    """Number of CPU packages (distinct ``physical id`` in /proc/cpuinfo); 1 when unknown."""
    ids: set[str] = set()
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "physical id":
                    ids.add(value.strip())
    except OSError:
        return 1
    return max(1, len(ids))


def _codecarbon_data_file(relpath: str) -> Path:
    """Path of a file in codecarbon's package data, found without importing codecarbon.

    ``importlib.resources.files("codecarbon")`` would execute ``codecarbon/__init__.py``,
    which imports its whole tracker stack; ``find_spec`` only locates the package.
    """
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the codecarbon package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / relpath


@functools.lru_cache(maxsize=1)
def _cpu_power_table() -> tuple[tuple[str, float], ...]:
    """(name, TDP in W) rows of codecarbon's cpu_power.csv, in file order."""
    rows: list[tuple[str, float]] = []
    with open(_codecarbon_data_file(_CPU_POWER_CSV), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                tdp_w = float(row["TDP"])
            except (KeyError, TypeError, ValueError):
                continue
            name = (row.get("Name") or "").strip()
            if name and math.isfinite(tdp_w) and tdp_w > 0:
                rows.append((name, tdp_w))
    return tuple(rows)


_NAME_NOISE = re.compile(r"\((?:r|tm)\)|®|™|@\s*[\d.]+\s*[gm]hz|\b[a-z0-9]+-core\b|\b(?:processor|cpu)\b")
_SPACES = re.compile(r"\s+")
_TOKEN = re.compile(r"[a-z0-9+]+")


def _normalise_cpu_name(name: str) -> str:
    """Lower-case model name without marks, clock, core-count suffix and filler words."""
    return _SPACES.sub(" ", _NAME_NOISE.sub(" ", name.lower())).strip()


def _tokens(normalised: str) -> frozenset[str]:
    return frozenset(_TOKEN.findall(normalised))


def _has_digit(tokens: frozenset[str]) -> bool:
    return any(ch.isdigit() for tok in tokens for ch in tok)


@functools.lru_cache(maxsize=1)
def _cpu_power_index() -> tuple[tuple[str, float, str, frozenset[str]], ...]:
    """(name, TDP in W, normalised name, tokens) for every row of cpu_power.csv."""
    rows = []
    for name, tdp_w in _cpu_power_table():
        norm = _normalise_cpu_name(name)
        rows.append((name, tdp_w, norm, _tokens(norm)))
    return tuple(rows)


def preload_tdp_table() -> None:
    """Index cpu_power.csv now (once per process), so that the first :func:`lookup_tdp_w` is a lookup; a
    missing table is left for that lookup to report."""
    try:
        _cpu_power_index()
    except (OSError, ValueError):
        pass


@functools.lru_cache(maxsize=16)
def lookup_tdp_w(cpu_model: str) -> tuple[float, str] | None:
    """Per-package TDP of ``cpu_model`` from codecarbon's cpu_power.csv.

    Deterministic matching, in order:
    1. the raw name, case-insensitively;
    2. the normalised name (no "(R)", "(TM)", "CPU", "Processor", "@ 2.20GHz", "64-Core");
    3. token subsets of the normalised names: the longest table entries whose tokens all occur
       in the model name (an entry must contain a model number, i.e. a token with a digit);
       accepted if they agree on the TDP. Failing that, the single table entry that contains
       every token of a model name that itself has a model number.

    Returns:
        ``(tdp_w, matched table name)``, or None when nothing matches or the table is missing.
    """
    try:
        index = _cpu_power_index()
    except OSError:
        return None
    raw = cpu_model.strip().lower()
    for name, tdp_w, _norm, _toks in index:
        if name.lower() == raw:
            return tdp_w, name
    wanted = _normalise_cpu_name(cpu_model)
    if not wanted:
        return None
    for name, tdp_w, norm, _toks in index:
        if norm == wanted:
            return tdp_w, name
    wanted_tokens = _tokens(wanted)
    has_digit = _has_digit(wanted_tokens)
    contained: list[tuple[int, str, float]] = []
    containing: list[tuple[str, float]] = []
    for name, tdp_w, _norm, toks in index:
        if not toks:
            continue
        if toks <= wanted_tokens and _has_digit(toks):
            contained.append((len(toks), name, tdp_w))
        elif has_digit and wanted_tokens <= toks:
            containing.append((name, tdp_w))
    if contained:
        longest = max(n for n, _, _ in contained)
        best = [(name, tdp_w) for n, name, tdp_w in contained if n == longest]
        if len({tdp_w for _, tdp_w in best}) == 1:
            return best[0][1], best[0][0]
        return None
    if len(containing) == 1:
        return containing[0][1], containing[0][0]
    return None


def _logical_cpus() -> int:
    import psutil

    return psutil.cpu_count(logical=True) or os.cpu_count() or 1


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ConfigError("scope", scope, SCOPES)
    return scope


def _check_interval(update_interval_s: float) -> float:
    if (
        isinstance(update_interval_s, bool)
        or not isinstance(update_interval_s, (int, float))
        or not math.isfinite(update_interval_s)
        or update_interval_s < 0
    ):
        raise ConfigError("update_interval_s", update_interval_s, "a finite number of seconds >= 0")
    return float(update_interval_s)


class _SteppedPower(EnergySource):
    """Integrates an estimated power over update intervals of at least ``update_interval_s``.

    Each update measures what happened *during* the interval that just ended (CPU time used, memory
    in use at both ends) and adds that interval's energy, so there is no warm-up hole: the first
    interval after ``start()`` is measured like any other. Between updates ``read()`` repeats the
    last update's reading (same time, same joules), which the sampler skips; ``read_final()`` forces
    an update, so a meter closed after 0.2 s still gets those 0.2 s.
    """

    _domain_name: str

    _scope = "system"  # set by each estimate from its ``scope``

    @property
    def sees_helper_processes(self) -> bool:  # type: ignore[override]
        """Only the ``system`` scope sees wattlog's helper processes (``process`` leaves them out)."""
        return self._scope == "system"

    def __init__(self, update_interval_s: float) -> None:
        self._update_interval_s = _check_interval(update_interval_s)
        self.resolution_s = self._update_interval_s
        self._energy_j = 0.0
        self._last_update_s = 0.0
        self._started = False

    def _begin(self) -> None:
        self._energy_j = 0.0
        self._last_update_s = self.now_s()
        self._started = True

    def _interval_energy_j(self, now_s: float, span_s: float) -> float:
        """Energy of the interval ``[now_s - span_s, now_s]`` just ended (may cost milliseconds)."""
        raise NotImplementedError

    def read(self, force: bool = False) -> Reading:
        """Cumulative estimated joules since ``start()``, as of the latest update."""
        if not self._started:
            raise SourceError(f"{type(self).__name__}.read() called before start()")
        now_s = self.now_s()
        span_s = now_s - self._last_update_s
        if span_s > 0 and (force or span_s >= self._update_interval_s):
            try:
                self._energy_j += max(0.0, float(self._interval_energy_j(now_s, span_s)))
            except Exception as exc:  # psutil.Error, OSError: the meter degrades this source
                raise SourceError(f"{type(self).__name__}: sampling failed: {exc}") from exc
            self._last_update_s = now_s
        return Reading(self._last_update_s, {self._domain_name: self._energy_j})

    def read_final(self) -> Reading:
        return self.read(force=True)

    def close(self) -> None:
        """Nothing to release."""
        self._started = False


class EstimatedCpu(_SteppedPower):
    """CPU power estimated as TDP x utilisation; domain ``cpu``.

    Args:
        tdp_w: whole-machine CPU power at 100 % utilisation (all sockets). None: looked up in
            codecarbon's cpu_power.csv by model name (x sockets), else
            ``DEFAULT_TDP_W_PER_THREAD`` x logical CPUs.
        scope: ``system`` (all busy CPU time of the machine, from ``psutil.cpu_times()``) or
            ``process`` (CPU time of this process and its live children, recursively, plus the
            reaped children's totals, over elapsed time x logical CPUs; wattlog's own delivery and
            chart processes left out, see :mod:`wattlog.helper_processes`).
        cpu_model: overrides the detected model name used for the table lookup.
        update_interval_s: minimum time between utilisation samples.

    Raises:
        ConfigError: bad ``scope``, ``tdp_w`` or ``update_interval_s``.
    """

    kind = "cpu"
    _domain_name = "cpu"

    def __init__(
        self,
        tdp_w: float | None = None,
        scope: str = "system",
        cpu_model: str | None = None,
        update_interval_s: float = 0.5,
    ) -> None:
        super().__init__(update_interval_s)
        if tdp_w is not None and (
            isinstance(tdp_w, bool)
            or not isinstance(tdp_w, (int, float))
            or not math.isfinite(tdp_w)
            or tdp_w <= 0
        ):
            raise ConfigError("tdp_w", tdp_w, "a finite number of watts > 0, or None to look it up")
        self._tdp_arg_w = None if tdp_w is None else float(tdp_w)
        self._scope = _check_scope(scope)
        self._cpu_model_arg = cpu_model
        self.cpu_model = cpu_model or ""
        self.tdp_w = self._tdp_arg_w or 0.0
        self.tdp_source = ""
        self._n_threads = 1
        self._last_busy_s = 0.0
        self._last_total_s = 0.0
        self._proc: object | None = None

    def resolve_tdp(self) -> tuple[float, str]:
        """The whole-machine TDP in watts and where it came from (``cpu_tdp_source``)."""
        if self._tdp_arg_w is not None:
            return self._tdp_arg_w, "user"
        match = lookup_tdp_w(self.cpu_model)
        if match is not None:
            tdp_w, name = match
            sockets = cpu_socket_count()
            suffix = f" x {sockets} sockets" if sockets > 1 else ""
            return tdp_w * sockets, f"codecarbon:cpu_power.csv:{name}{suffix}"
        threads = _logical_cpus()
        return threads * DEFAULT_TDP_W_PER_THREAD, (
            f"default:{threads} threads x {DEFAULT_TDP_W_PER_THREAD:g} W"
        )

    def start(self) -> list[Domain]:
        """Resolve the TDP, take the first CPU-time sample and return the ``cpu`` domain."""
        try:
            import psutil

            self.cpu_model = self._cpu_model_arg or cpu_model_name()
            self.tdp_w, self.tdp_source = self.resolve_tdp()
            self._n_threads = _logical_cpus()
            self._proc = psutil.Process() if self._scope == "process" else None
            self._last_busy_s, self._last_total_s = self._cpu_seconds()
        except Exception as exc:  # ImportError, OSError, psutil.Error
            raise SourceUnavailable(f"CPU estimate unavailable: {exc}") from exc
        self._begin()
        return [Domain("cpu", "cpu", "estimate", True, 0, self.tdp_w)]

    def _cpu_seconds(self) -> tuple[float, float]:
        """Cumulative (busy CPU-seconds, denominator CPU-seconds); denominator 0 in process scope."""
        import psutil

        if self._proc is None:
            t = psutil.cpu_times()
            total_s = sum(t)
            # Linux counts guest time inside user time; idle and iowait are not busy.
            total_s -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
            return total_s - t.idle - getattr(t, "iowait", 0.0), total_s
        proc = self._proc
        with helper_processes.LOCK:  # a helper reaped meanwhile would be in neither or in both totals
            t = proc.cpu_times()  # type: ignore[attr-defined]
            busy_s = t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
            busy_s -= helper_processes.reaped_cpu_s()  # wattlog's own, reaped: in children_user/system
            helpers = helper_processes.live_pids()
            for child in proc.children(recursive=True):  # type: ignore[attr-defined]
                try:
                    ct = child.cpu_times()
                except psutil.Error:  # exited between listing and reading: its time is lost or reaped
                    continue
                if child.pid in helpers:
                    helper_processes.note_cpu_s(child.pid, ct.user + ct.system)
                else:
                    busy_s += ct.user + ct.system
        return busy_s, 0.0

    def _utilisation(self, wall_span_s: float) -> float:
        """Mean utilisation (0..1) of the whole machine's CPUs over the interval just ended."""
        busy_s, total_s = self._cpu_seconds()
        if self._proc is None:
            span_s = total_s - self._last_total_s
        else:
            span_s = wall_span_s * self._n_threads
        used_s = busy_s - self._last_busy_s
        self._last_busy_s, self._last_total_s = busy_s, total_s
        if span_s <= 0:
            return 0.0
        return min(1.0, max(0.0, used_s / span_s))

    def _interval_energy_j(self, now_s: float, span_s: float) -> float:
        return self.tdp_w * self._utilisation(span_s) * span_s

    def provenance(self) -> dict[str, str]:
        """``cpu_method``, ``cpu_model``, ``cpu_tdp_w``, ``cpu_tdp_source``, ``cpu_scope``."""
        return {
            "cpu_method": "estimate",
            "cpu_model": self.cpu_model,
            "cpu_tdp_w": f"{self.tdp_w:g}",
            "cpu_tdp_source": self.tdp_source,
            "cpu_scope": self._scope,
        }


class EstimatedRam(_SteppedPower):
    """RAM power estimated from memory in use: ``units.RAM_W_PER_GB`` per GiB; domain ``ram``.

    GB is taken as GiB (2**30 bytes), as codecarbon does: the Green Algorithms figure derives
    from DIMM power per DIMM size, and DIMM sizes are binary.

    Args:
        scope: ``process``: resident set size of this process and its children, recursively,
            wattlog's own helper processes left out (RSS counts pages shared by forked workers once per process, so it is an upper
            bound); ``system``: total minus available memory of the machine.
        update_interval_s: minimum time between memory samples (the process-tree walk costs ms).

    Raises:
        ConfigError: bad ``scope`` or ``update_interval_s``.
    """

    kind = "ram"
    _domain_name = "ram"

    def __init__(self, scope: str = "process", update_interval_s: float = 1.0) -> None:
        super().__init__(update_interval_s)
        self._scope = _check_scope(scope)
        self._proc: object | None = None
        self._power_w = 0.0

    def start(self) -> list[Domain]:
        """Take the first memory sample and return the ``ram`` domain."""
        try:
            import psutil

            self._proc = psutil.Process() if self._scope == "process" else None
            self._power_w = self._power_from_bytes(self._used_bytes())
        except Exception as exc:  # ImportError, OSError, psutil.Error
            raise SourceUnavailable(f"RAM estimate unavailable: {exc}") from exc
        self._begin()
        return [Domain("ram", "ram", "estimate", True, 0)]

    @staticmethod
    def _power_from_bytes(used_bytes: float) -> float:
        return units.RAM_W_PER_GB * used_bytes / 2**30

    def _used_bytes(self) -> float:
        """Memory in use, in bytes, for the configured scope."""
        import psutil

        if self._proc is None:
            vm = psutil.virtual_memory()
            return float(vm.total - vm.available)
        proc = self._proc
        used = float(proc.memory_info().rss)  # type: ignore[attr-defined]
        with helper_processes.LOCK:
            helpers = helper_processes.live_pids()
            children = proc.children(recursive=True)  # type: ignore[attr-defined]
        for child in children:
            if child.pid in helpers:
                continue  # wattlog's own delivery or chart process
            try:
                used += child.memory_info().rss
            except psutil.Error:
                continue
        return used

    def _interval_energy_j(self, now_s: float, span_s: float) -> float:
        """Trapezoid of the memory power at both ends of the interval."""
        power_w = self._power_from_bytes(self._used_bytes())
        energy_j = 0.5 * (self._power_w + power_w) * span_s
        self._power_w = power_w
        return energy_j

    def provenance(self) -> dict[str, str]:
        """``ram_method``, ``ram_scope``."""
        return {"ram_method": "estimate", "ram_scope": self._scope}
