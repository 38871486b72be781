"""Settings declared once: each is a dataclass field carrying its flag, its
``MERIDIAN_*`` environment twin, its help and its default.

``add_arguments`` turns a settings dataclass into argparse flags whose help
shows the default and the environment name; ``from_args`` builds the
dataclass back. Precedence: flag, then environment, then default. An
environment value that does not parse is a one-line usage error, as a bad
flag value is. Booleans accept 1/0, true/false, yes/no, on/off, both as
environment values and as ``--flag`` / ``--no-flag``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Secret(str):
    """A setting's value that must not be shown: its repr (and so the
    config's) hides it; str() is the value itself."""

    def __repr__(self) -> str:
        return "'<redacted>'" if self else "''"


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"expected one of 1/0, true/false, yes/no, on/off, got {value!r}")


def setting(
    default: Any,
    help: str,  # noqa: A002 - argparse's own word
    *,
    parse: Callable[[str], Any] | None = None,
    env: str | None = None,
    choices: Sequence[str] | None = None,
    show: str | None = None,
) -> Any:
    """A dataclass field that is also a flag. ``parse`` turns the flag's or
    the environment's text into the value (default: the default's type);
    ``env`` overrides the environment name (default: ``MERIDIAN_<FLAG>``);
    ``show`` is how --help shows the default."""
    meta = {"help": help, "parse": parse, "env": env, "choices": choices, "show": show}
    return dataclasses.field(default=default, metadata={"setting": meta})


def env_name(field: dataclasses.Field) -> str:
    meta = field.metadata["setting"]
    return meta["env"] or "MERIDIAN_" + field.name.upper()


def _parser_for(field: dataclasses.Field) -> Callable[[str], Any]:
    meta = field.metadata["setting"]
    if meta["parse"] is not None:
        return meta["parse"]
    if isinstance(field.default, bool):
        return parse_bool
    if isinstance(field.default, int):
        return int
    if isinstance(field.default, float):
        return float
    return str


def add_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per setting of ``cls``. Call ``from_args`` with the
    parsed namespace; environment errors surface there as usage errors."""
    for f in dataclasses.fields(cls):
        if "setting" not in f.metadata:
            continue
        meta = f.metadata["setting"]
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f)
        shown = meta["show"] if meta["show"] is not None else f.default
        if isinstance(f.default, bool):
            shown = "on" if f.default else "off"
        elif shown == "":
            shown = "none"
        help_ = f"{meta['help']} (default: {shown}; env {env})"
        if isinstance(f.default, bool):
            p.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        else:
            p.add_argument(
                flag,
                dest=f.name,
                type=_parser_for(f),
                choices=meta["choices"],
                default=None,
                metavar=f.name.upper() if meta["choices"] is None else None,
                help=help_,
            )
    p.set_defaults(_settings_parser=p)


def from_args(cls: type[T], ns: argparse.Namespace, environ: dict[str, str] | None = None) -> T:
    """Build ``cls`` from parsed flags, falling back to the environment, then
    to each setting's default."""
    env = os.environ if environ is None else environ
    parser: argparse.ArgumentParser | None = getattr(ns, "_settings_parser", None)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "setting" not in f.metadata:
            continue
        value = getattr(ns, f.name, None)
        if value is None:
            raw = env.get(env_name(f), "")
            if raw != "":
                try:
                    value = _parser_for(f)(raw)
                except (ValueError, TypeError) as e:
                    msg = f"{env_name(f)}={raw!r}: {e}"
                    if parser is None:
                        raise ValueError(msg) from None
                    parser.error(msg)
                choices = f.metadata["setting"]["choices"]
                if choices is not None and value not in choices:
                    msg = f"{env_name(f)}={raw!r}: choose from {', '.join(choices)}"
                    if parser is None:
                        raise ValueError(msg)
                    parser.error(msg)
        if value is not None:
            values[f.name] = value
    return cls(**values)
