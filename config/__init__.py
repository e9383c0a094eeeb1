"""Configuration: the typed schema, `VERL_*` environment overrides and Hydra loading.

The YAML files next to this module are Hydra's config tree (`pkg://config`).
"""

from config.loading import register_resolvers
from config.verl import register_with_hydra

register_resolvers()
register_with_hydra()
