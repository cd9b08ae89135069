"""Part 6 of the GPU validation: wattlog's meter against Zeus's ``ZeusMonitor`` over the same span.

A plain PyTorch BERT-base masked-LM training loop (bf16 autocast) runs for ``zeus_span_s``. Zeus opens its
window (``begin_window``, which synchronises CUDA and reads the NVML counter) and wattlog marks its meter
right after it; at the end wattlog marks first, then Zeus closes. Target: |wattlog - Zeus| / Zeus <= 1 %.
"""

from __future__ import annotations

import time

from common import DRY, P, Result, Skip, has_cuda, install_nvml, log, quiet_warnings, rel


def run_zeus(res: Result) -> None:
    quiet_warnings()
    install_nvml()
    httpx_stubbed = False
    if DRY:
        from dryrun_nvml import stub_httpx

        httpx_stubbed = stub_httpx()
    try:
        from zeus.monitor import ZeusMonitor
    except ImportError as exc:
        raise Skip(f"zeus is not installed ({exc}); carry .whl/gpu (bench/gpu/fetch_wheels.sh)") from exc
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from wattlog.meter import EnergyMeter
    from wattlog.sources.nvml import NvmlGpu

    cuda = has_cuda()
    dev = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res["plan"] = {
        "span_s": P["zeus_span_s"],
        "workload": "BertForMaskedLM(BertConfig()) AdamW, bf16 autocast, "
        f"batch {P['train_batch']}x{P['train_seq']}",
        "cuda": cuda,
        "zeus": "ZeusMonitor(gpu_indices=[0], cpu_indices=[]); begin/end_window(sync_execution=cuda)",
        "wattlog": "EnergyMeter([NvmlGpu(cuda_devices=[0])], sample_interval_s=0.02), mark/close",
    }
    res["zeus_httpx_stubbed"] = httpx_stubbed
    torch.manual_seed(0)
    with torch.device(dev):
        model = BertForMaskedLM(BertConfig(**P["bert"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (P["train_batch"], P["train_seq"]), device=dev)

    def step() -> None:
        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10 if not DRY else 2):
        step()
    sync()
    zm = ZeusMonitor(gpu_indices=[0], cpu_indices=[], sync_execution_with="torch")
    meter = EnergyMeter([NvmlGpu(cuda_devices=[0])], sample_interval_s=0.02)
    domains = meter.start()
    gpu = domains[0].name
    span = float(P["zeus_span_s"])
    if res.remaining_s() < span + 20:
        span = max(5.0 if not DRY else 0.5, res.remaining_s() - 20)
        res["span_shortened_to_s"] = span
    try:
        time.sleep(0.3)
        zm.begin_window("span", sync_execution=cuda)
        meter.mark("span")
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < span:
            step()
            n += 1
        sync()
        meter.mark("after")
        m = zm.end_window("span", sync_execution=cuda)
        time.sleep(0.1)
    finally:
        segments = meter.close()
    seg = next(s for s in segments if s.label == "span")
    w_j, z_j = seg.energy_j[gpu], float(m.gpu_energy[0])
    r = rel(w_j, z_j)
    res["result"] = {
        "steps": n,
        "wattlog_j": w_j,
        "wattlog_s": seg.duration_s,
        "zeus_j": z_j,
        "zeus_s": m.time,
        "wattlog_w": w_j / seg.duration_s,
        "zeus_w": z_j / m.time if m.time else None,
        "rel_diff": r,
        "wattlog_method": domains[0].method,
        "degraded": sorted(meter.degraded),
    }
    res["summary"] = {
        "wattlog_j": w_j,
        "zeus_j": z_j,
        "span_s": seg.duration_s,
        "rel_diff": r,
        "pass": abs(r) <= 0.01,
    }
    log(f"zeus: wattlog {w_j:.1f} J, Zeus {z_j:.1f} J over {seg.duration_s:.2f} s ({r:+.3%})")
