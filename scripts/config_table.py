"""Print the configuration key table (Markdown) for the README: every key of the typed schema,
its value in the bundled base config, and its help text.

    python scripts/config_table.py [sft|rl]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402


def rows(cls, values: dict, prefix: str = ""):
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from rows(f.default_factory, values.get(f.name) or {}, key + ".")
            continue
        yield key, values.get(f.name), f.metadata.get("help", "")


def base_values(config_name: str) -> dict:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose(config_name)
    cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg.pop("hydra", None)
    return cfg


def main() -> None:
    from config.schema import SFTConfig

    which = sys.argv[1] if len(sys.argv) > 1 else "sft"
    if which == "rl":
        from config.rl_schema import RLConfig as root

        values = base_values("grpo_trainer")
    else:
        root, values = SFTConfig, base_values("sft_trainer")
    print("| key | base config | meaning |")
    print("|---|---|---|")
    for key, default, help_text in rows(root, values):
        shown = "null" if default is None else str(default).replace("|", "\\|")
        meaning = help_text.replace("|", "\\|")
        print(f"| `{key}` | `{shown}` | {meaning} |")


if __name__ == "__main__":
    main()
