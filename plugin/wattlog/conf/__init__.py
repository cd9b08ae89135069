"""Packaged Hydra configs (``pkg://wattlog.conf``). Hydra needs this ``__init__.py`` to read the package."""
