"""Puts this project's configs on Hydra's search path, so a user's own YAML in another
`--config-path` can say `defaults: [sft_trainer, _self_]`."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class TrainerSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="sample-aware-trainer", path="pkg://config")
