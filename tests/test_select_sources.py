"""Auto-detection with ordered fallbacks, and the `wattlog devices` / `wattlog measure` commands."""

from __future__ import annotations

import json

import pytest
from fakes.nvml import FakeGpu, FakeNvml
from fakes.powercap import make_powercap

from wattlog.cli import main as cli_main
from wattlog.errors import ConfigError, SourceUnavailable
from wattlog.sources import select_sources


def _by_kind(choices):
    return {c.kind: c for c in choices}


def test_no_gpu_no_rapl_falls_back_to_estimates_with_reasons(monkeypatch, tmp_path):
    FakeNvml([], library_missing=True).install(monkeypatch)
    choices = _by_kind(select_sources(powercap_root=tmp_path / "absent"))
    assert choices["gpu"].method == "none" and choices["gpu"].source is None
    assert "no GPU measured" in choices["gpu"].reason and "NVML" in choices["gpu"].reason
    assert choices["cpu"].method == "estimate" and choices["cpu"].estimated
    assert "RAPL not readable" in choices["cpu"].reason
    assert choices["ram"].method == "estimate" and choices["ram"].estimated


def test_gpu_counter_and_rapl_with_dram(monkeypatch, tmp_path):
    FakeNvml([FakeGpu(), FakeGpu(has_counter=False)]).install(monkeypatch)
    pc = make_powercap(tmp_path, packages=2, dram=True)
    choices = _by_kind(select_sources(powercap_root=pc.root))
    assert choices["gpu"].method == "counter,power"
    assert not choices["gpu"].estimated
    assert choices["cpu"].method == "rapl" and not choices["cpu"].estimated
    assert choices["ram"].method == "rapl" and choices["ram"].source is None  # read by the RAPL CPU source
    domains = [d.name for d in choices["cpu"].source.start()]
    choices["cpu"].source.close()
    assert sorted(domains) == ["cpu0", "cpu1", "dram0", "dram1"]


def test_explicit_requests_fail_clearly(monkeypatch, tmp_path):
    FakeNvml([], library_missing=True).install(monkeypatch)
    with pytest.raises(SourceUnavailable, match="NVML"):
        select_sources(gpus=[0], cpu="none", ram="none")
    with pytest.raises(SourceUnavailable, match="RAPL"):
        select_sources(gpus="none", cpu="rapl", powercap_root=tmp_path / "absent")
    with pytest.raises(ConfigError, match="cpu='rapll' is not valid"):
        select_sources(cpu="rapll")


def test_require_counter(monkeypatch):
    FakeNvml([FakeGpu(has_counter=False)]).install(monkeypatch)
    with pytest.raises(SourceUnavailable, match="Volta"):
        select_sources(gpus="auto", cpu="none", ram="none", require_gpu_counter=True)


def test_devices_cli_json_and_table(monkeypatch, capsys):
    FakeNvml([FakeGpu(name="NVIDIA H100 80GB HBM3")]).install(monkeypatch)
    assert cli_main(["devices", "--json"]) == 0
    rows = {r["kind"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gpu"]["label"] == "measured" and rows["gpu"]["domains"] == ["gpu0"]
    assert rows["gpu"]["provenance"]["gpu_model"] == "NVIDIA H100 80GB HBM3"
    assert rows["cpu"]["label"] in ("measured", "estimated")
    assert cli_main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "kind" in out and "why" in out and "gpu0" in out
    assert cli_main(["devices", "--cpu", "bogus"]) == 2


def test_measure_cli_prints_labelled_table(monkeypatch, capsys):
    FakeNvml([], library_missing=True).install(monkeypatch)
    assert cli_main(["measure", "--seconds", "0.3", "--gpus", "none"]) == 0
    out = capsys.readouterr().out
    assert "busy" in out and "idle" in out and "estimated" in out
