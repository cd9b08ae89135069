"""Importing wattlog is cheap: no heavy frameworks, no hardware."""

import json
import subprocess
import sys

import pytest

HEAVY = ["torch", "lightning", "pytorch_lightning", "mlflow", "hydra", "pandas", "matplotlib", "pynvml"]


def test_import_pulls_no_frameworks_and_touches_no_hardware():
    code = (
        "import sys, builtins, json\n"
        "opened = []\n"
        "real_open = builtins.open\n"
        "def spy(f, *a, **k):\n"
        "    opened.append(str(f)); return real_open(f, *a, **k)\n"
        "builtins.open = spy\n"
        "import wattlog, wattlog.meter, wattlog.sources, wattlog.sources.nvml, wattlog.sources.rapl, "
        "wattlog.sources.estimate, wattlog.carbon, wattlog.ledger, wattlog.cli\n"
        f"print(json.dumps({{'mods': [m for m in {HEAVY!r} if m in sys.modules], 'opened': opened}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["mods"] == []
    assert not [f for f in result["opened"] if f.startswith(("/sys", "/proc", "/dev"))]


@pytest.mark.slow  # imports Lightning in a subprocess (~9 s)
def test_energy_monitor_is_lazy():
    pytest.importorskip("lightning")
    code = "import sys, wattlog; assert 'lightning' not in sys.modules; wattlog.EnergyMonitor; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_preload_imports_only_wattlog_and_reads_no_proc_or_sys():
    """EnergyMonitor(...) preloads the set-up's modules; that must stay free of frameworks and hardware."""
    code = (
        "import sys, builtins, os, json\n"
        "opened = []\n"
        "real_open, real_os_open = builtins.open, os.open\n"
        "builtins.open = lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1]\n"
        "os.open = lambda f, *a, **k: (opened.append(str(f)), real_os_open(f, *a, **k))[1]\n"
        "from wattlog.session import preload\n"
        "preload()\n"
        f"print(json.dumps({{'mods': [m for m in {HEAVY + ['psutil']!r} if m in sys.modules], "
        "'loaded': 'wattlog.sinks.mlflow' in sys.modules and 'wattlog.sources.nvml' in sys.modules, "
        "'opened': opened}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["mods"] == [] and result["loaded"]
    assert not [f for f in result["opened"] if f.startswith(("/sys", "/proc", "/dev"))]
