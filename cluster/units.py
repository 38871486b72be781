"""Sizes and rates as people write them on command lines."""

from __future__ import annotations


def parse_size(value: str) -> int:
    """``"20M"`` -> 20971520 (K, M, G are powers of 1024, as everywhere in
    Meridian); a trailing ``B``/``iB`` or ``/s`` is allowed; plain numbers are
    bytes."""
    v = value.strip().upper().removesuffix("/S").removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if v.endswith(suffix):
            v, mult = v[:-1], m
            break
    return int(float(v) * mult)
