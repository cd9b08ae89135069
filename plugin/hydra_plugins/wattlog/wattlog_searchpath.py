"""Makes wattlog's packaged ``energy`` config group visible to every Hydra app.

Hydra imports this module at every app start, so it imports nothing beyond Hydra itself;
the structured-config schema is registered when the search path is built.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class WattlogSearchPathPlugin(SearchPathPlugin):
    """Appends ``pkg://wattlog.conf`` (groups ``energy`` and ``hydra/callbacks``) to the search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from wattlog.integrations.hydra import register_configs

        register_configs()
        search_path.append(provider="wattlog", path="pkg://wattlog.conf")
