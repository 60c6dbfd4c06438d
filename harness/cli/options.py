"""Settings flags, generated from the ``Settings`` fields (their help text lives there).

A new setting gets its flag here, its config-file key and its ``PERSONA_HARNESS_<FIELD>``
variable at once; there is no second list to forget it in.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

GROUP_TITLE = "settings (flags > PERSONA_HARNESS_* environment > config file > defaults)"


def setting_flags() -> list[tuple[str, dataclasses.Field]]:
    """(flag, field) for every setting that has a command-line flag."""
    from harness.core.config import FIELDS

    out = []
    for name, f in FIELDS.items():
        flag = f.metadata.get("flag")
        if flag == "":
            continue
        out.append((flag or "--" + name.replace("_", "-"), f))
    return out


def _type_of(f: dataclasses.Field) -> Any:
    default = f.default
    if isinstance(default, bool):
        return bool
    for t in (int, float):
        if isinstance(default, t):
            return t
    return str


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """Add every settings flag (dest ``set_<field>``) and ``--config`` to a sub-command's parser."""
    g = p.add_argument_group(GROUP_TITLE)
    for flag, f in setting_flags():
        dest, help_, kind = f"set_{f.name}", f.metadata["help"], f.metadata.get("kind")
        if kind == "append":
            g.add_argument(flag, dest=dest, action="append", default=None, help=help_)
        elif _type_of(f) is bool:
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_} (default {'on' if f.default else 'off'})")
        else:
            g.add_argument(flag, dest=dest, type=_type_of(f), default=None, help=help_)
    g.add_argument("--config", dest="config", default=None, help="TOML config file (trusted: may name plugins)")


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Field -> value for the settings flags given on the command line (absent ones left out)."""
    flags: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k.startswith("set_") and v is not None:
            flags[k[4:]] = tuple(v) if isinstance(v, list) else v
    return flags


def settings_from_args(args: argparse.Namespace):
    from harness.core.config import load_settings

    return load_settings(flags_from_args(args), config_path=getattr(args, "config", None))
