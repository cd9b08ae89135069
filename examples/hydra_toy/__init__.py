"""A tiny Hydra + Lightning app showing wattlog's ``energy`` config group and energy-aware sweeps."""
