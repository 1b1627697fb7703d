"""YAML experiment configs with ``key.sub=value`` command-line overrides.

Override values are parsed as YAML scalars, so ``amp.enabled=false`` is the boolean False (never the
string "False" that argparse's ``type=bool`` would turn into True) and ``lr=1e-4`` is a float.
A config may name a ``base:`` file (relative to itself) whose values it overrides.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; accept it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(raw: str) -> Any:
    return yaml.load(raw, Loader=_Loader)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_path(name: str | Path) -> Path:
    """A config path, or a bare name of a packaged config (``nyuv2_ctal`` -> ctal/configs/nyuv2_ctal.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = CONFIG_DIR / (p.name if p.suffix else p.name + ".yaml")
    if packaged.is_file():
        return packaged
    choices = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {str(name)!r} not found (neither a file nor a packaged config: {choices})")


def load(name: str | Path) -> dict:
    path = resolve_path(name)
    with open(path) as f:
        cfg = yaml.load(f, Loader=_Loader) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(cfg).__name__}")
    base = cfg.pop("base", None)
    if base:
        cfg = _merge(load(path.parent / base), cfg)
    return cfg


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings; unknown top-level sections are an error (typo guard)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in cfg:
            raise ValueError(f"override {item!r}: unknown key {parts[0]!r}; known: {sorted(cfg)}")
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = parse_value(raw)
    return cfg


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node
