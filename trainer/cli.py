"""Command-line glue shared by the trainers' Hydra entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

BUNDLED = "pkg://config"


def normalize_config_path(argv: Sequence[str], cwd: Path) -> list[str]:
    """Make `--config-path DIR` mean DIR relative to the current directory.

    Hydra resolves a relative path against the script's own folder, which surprises users of an
    installed package. A relative DIR that exists under the current directory becomes absolute;
    `config` (as in verl's documented commands) means the configs bundled with this project.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config-path", "-cp") and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1], cwd)
        elif arg.startswith("--config-path="):
            out[i] = "--config-path=" + _resolve(arg.split("=", 1)[1], cwd)
    return out


def _resolve(path: str, cwd: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    candidate = cwd / path
    if candidate.is_dir():
        return str(candidate.resolve())
    if Path(path).parts == ("config",):
        return BUNDLED
    return str(candidate)
