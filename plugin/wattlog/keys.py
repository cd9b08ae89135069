"""Every MLflow metric key, param and tag name wattlog writes: one registry (the key contract).

Units are in the names: ``_j`` joules, ``_w`` watts, ``_g`` grams CO2e, ``_s`` seconds.
Human-facing output converts with :mod:`wattlog.render`; MLflow always gets these units.

Older runs (wattlog < 0.2) logged energies in kWh under ``*_kwh`` names; :data:`LEGACY_KWH`
maps each current joule key to its old name, so readers (compare, report, sync) accept both.
"""

from __future__ import annotations

from wattlog.units import J_PER_KWH

PREFIX = "energy/"

# -- per training step (every log_every_n_steps, at Lightning's step for the batch) ---------------
STEP_J = "energy/step_j"
POWER_W = "energy/power_w"
GPU_POWER_W = "energy/gpu_power_w"
TOTAL_J = "energy/total_j"
EMISSIONS_G = "energy/emissions_g"


def gpu_device_power_w(index: int) -> str:
    """``energy/gpu{i}_power_w``: one GPU's mean power over the step (global index in the job)."""
    return f"energy/gpu{index}_power_w"


# -- summaries (once per stage, at the stage's documented step) ---------------------------------
KINDS = ("gpu", "cpu", "ram")
STAGES = ("train", "val", "test", "predict")


def kind_j(kind: str) -> str:
    """``energy/{gpu,cpu,ram}_j``: run total of one kind of domain."""
    return f"energy/{kind}_j"


def stage_j(stage: str) -> str:
    """``energy/{train,val,test,predict}_j``: run total of one stage."""
    return f"energy/{stage}_j"


def stage_j_per_sample(stage: str) -> str:
    """``energy/j_per_sample`` for train, ``energy/{val,test,predict}_j_per_sample`` otherwise."""
    return "energy/j_per_sample" if stage == "train" else f"energy/{stage}_j_per_sample"


AVG_POWER_W = "energy/avg_power_w"
DURATION_S = "energy/duration_s"
J_TO_TARGET = "energy/j_to_target"
IDLE_POWER_W = "energy/idle_power_w"
DYNAMIC_J = "energy/dynamic_j"
RERUN_J = "energy/rerun_j"


def fit_stage_keys(stage: str) -> dict[str, str]:
    """Summary keys of a fit stage named ``stage`` (e.g. ``recover``), by the train key they replace.

    ``{}`` for ``train``; ``{"energy/train_j": "energy/recover_j", "energy/j_per_sample":
    "energy/recover_j_per_sample"}`` for ``recover``.
    """
    if stage == "train":
        return {}
    return {stage_j("train"): stage_j(stage), stage_j_per_sample("train"): stage_j_per_sample(stage)}


# -- payback of a compressed model (see wattlog.payback) --------------------------------------------
MAKE_STAGES = ("recover", "distill")
"""Fit stages whose energy makes a compressed variant (recovery fine-tune, knowledge distillation)."""
MAKE_J = "energy/make_j"
PAYBACK_SAMPLES = "energy/payback_samples"

# -- params ---------------------------------------------------------------------------------------
P_GPU_MODEL = "energy.gpu_model"
P_GPU_COUNT = "energy.gpu_count"
P_GPU_METHOD = "energy.gpu_method"
P_CPU_METHOD = "energy.cpu_method"
P_RAM_METHOD = "energy.ram_method"
P_INTENSITY = "energy.carbon_intensity_g_per_kwh"
P_CARBON_SOURCE = "energy.carbon_source"
P_PUE = "energy.pue"
P_CHECKPOINT_TRAIN_J = "energy.checkpoint_train_j"
P_CHECKPOINT_RUN_ID = "energy.checkpoint_run_id"

# -- tags -----------------------------------------------------------------------------------------
T_ESTIMATED = "energy.estimated"
T_DEGRADED = "energy.degraded"
T_PARTIAL = "energy.partial"
T_ATTEMPTS = "energy.attempts"
T_SHORT_RUN = "energy.short_run"
T_SWEEP_ID = "energy.sweep_id"
T_SWEEP_JOB = "energy.sweep_job"
T_OVERRIDES = "energy.overrides"
T_PAYBACK = "energy.payback"


def attempt_tag(n: int) -> str:
    """``energy.attempt.{n}``: id and start step of the n-th fit attempt of a run."""
    return f"energy.attempt.{n}"


# -- artifacts ------------------------------------------------------------------------------------
ARTIFACT_DIR = "energy"
TRACE_CSV = "trace.csv"
POWER_PNG = "power.png"

# -- legacy names (wattlog < 0.2 logged kWh) -------------------------------------------------------
LEGACY_KWH: dict[str, str] = {
    TOTAL_J: "energy/total_kwh",
    J_TO_TARGET: "energy/kwh_to_target",
    DYNAMIC_J: "energy/dynamic_kwh",
    RERUN_J: "energy/rerun_kwh",
    **{kind_j(k): f"energy/{k}_kwh" for k in KINDS},
    **{stage_j(s): f"energy/{s}_kwh" for s in STAGES},
}


def read_j(metrics: dict[str, float], key: str) -> float | None:
    """The value of joule key ``key`` in a run's metrics, converting a legacy ``*_kwh`` value.

    Returns None when neither name is present.
    """
    if key in metrics and metrics[key] is not None:
        return float(metrics[key])
    legacy = LEGACY_KWH.get(key)
    if legacy is not None and metrics.get(legacy) is not None:
        return float(metrics[legacy]) * J_PER_KWH
    return None
