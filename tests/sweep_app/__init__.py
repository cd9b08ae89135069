"""A Hydra + Lightning app that builds its own ``MLFlowLogger`` with ``hydra.utils.instantiate`` (issue 12)."""
