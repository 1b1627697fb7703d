"""YAML experiment configs with ``key.sub=value`` command-line overrides.

Override values are parsed as YAML scalars, so ``amp.enabled=false`` is the boolean False (never the
string "False" that argparse's ``type=bool`` would turn into True) and ``lr=1e-4`` is a float.
A config may name a ``base:`` file (relative to itself) whose values it overrides.

:data:`SCHEMA` lists every section and key a run reads, with its type and range; :func:`validate`
checks a whole config against it (unknown keys with close-match suggestions, wrong types, values
out of range) before anything is built, naming the dotted key, the value and what was expected.
It also holds the defaults of the keys a config may leave out: :func:`with_defaults` fills them in
(configs on disk and :func:`load` stay as written).
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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
    choices = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml") if not q.stem.startswith("_"))
    close = difflib.get_close_matches(p.stem, choices, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise FileNotFoundError(f"config {str(name)!r} not found (neither a file nor a packaged config){hint} "
                            f"Packaged configs: {choices}")


def load(name: str | Path, _chain: tuple = ()) -> dict:
    """Read a config (a path or a packaged name), merged over the ``base:`` it names, if any."""
    path = resolve_path(name)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: its base: chain loops back to itself ({cycle})")
    try:
        with open(path) as f:
            cfg = yaml.load(f, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise ConfigError(f"config {path} cannot be read ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(cfg).__name__}")
    base = cfg.pop("base", None)
    if base:
        cfg = _merge(load(path.parent / base, (*_chain, path.resolve())), cfg)
    return cfg


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings; unknown top-level sections are an error (typo guard)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        known = sorted(set(cfg) | set(SCHEMA.keys))
        if parts[0] not in known:
            close = difflib.get_close_matches(parts[0], known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"override {item!r}: unknown key {parts[0]!r}{hint} (known: {known})")
        node = cfg
        for p in parts[:-1]:
            if node.get(p) is None:  # a section the config leaves out (or sets to null)
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        try:
            node[parts[-1]] = parse_value(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({' '.join(str(e).split())})") from None
    return cfg


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


# --- schema ------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config that cannot describe a run (unknown key, wrong type, value out of range)."""


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT = _NoDefault()  # a key without a default: left out means left out


@dataclass(frozen=True)
class Key:
    """One config entry: ``kind`` is int, float (any number), bool, str, path (str or os.PathLike),
    list, dict (a free-form mapping) or any; ``none``: null allowed; ``ge`` / ``gt``: inclusive /
    exclusive lower bound of a number; ``choices``: allowed strings (case-insensitive);
    ``default``: the value of a config that leaves the key out (:func:`with_defaults`)."""
    kind: str
    none: bool = False
    ge: Optional[float] = None
    gt: Optional[float] = None
    choices: tuple = ()
    required: bool = False
    default: Any = NO_DEFAULT


@dataclass(frozen=True)
class Section:
    """A mapping of known keys; ``open`` ones pass further keys on as keyword arguments
    (``model``: to the model class, which rejects the ones it does not take). ``default``: the
    mapping that stands for the section when a config leaves it out or sets it to null (then
    its keys' defaults fill in); None: such a section stays absent (or null)."""
    keys: dict = field(default_factory=dict)
    none: bool = False
    required: bool = False
    open: bool = False
    default: Optional[dict] = None


SCHEMA = Section({
    "name": Key("str", none=True, default=None),
    "device": Key("str", default="auto"),
    "seed": Key("int", default=0),
    "output_dir": Key("path", none=True, default=None),  # null: outputs/<name>
    "data": Section({
        "dataset": Key("str", required=True),
        "root": Key("path", required=True),
        "generate": Section({
            "num_train": Key("int", ge=1), "num_val": Key("int", ge=1), "size": Key("list"),
            "seed": Key("int", default=0), "workers": Key("int", none=True, ge=0, default=None),
        }, none=True),  # null or absent: the data is on disk already
        "tasks": Key("list", none=True, default=None),  # null: every task of the dataset
        "batch_size": Key("int", ge=1, default=8),
        "eval_batch_size": Key("int", none=True, ge=1, default=None),  # null: batch_size
        "num_workers": Key("int", ge=0, default=0),
        "augment": Key("any", none=True, default=False),  # bool, a recipe name or null
        "options": Key("dict", none=True, default=None),  # dataset keyword arguments (resize, num_classes, ...)
    }, required=True),
    # No defaults here: every key goes to the model class as a keyword, whose own defaults apply.
    "model": Section({
        "name": Key("str", required=True),
        "backbone": Key("str"),
        "pretrained": Key("bool"),
        "weights": Key("path", none=True),
        "ctal_backend": Key("str"),
        "gamma": Key("float"),
        "dilated": Key("bool", none=True),
        "alpha": Key("float"), "beta": Key("float"),
        "stages": Key("list"), "nddr_stages": Key("list"),
        "mixing_lr_mult": Key("float", gt=0),
        "single_task_weights": Key("dict", none=True),
        "sal_channels": Key("int", ge=1),  # 1 (sigmoid logit) or 2 (softmax), checked when built
    }, required=True, open=True),
    "optim": Section({
        "name": Key("str", required=True, choices=("adam", "adamw", "sgd")),
        "lr": Key("float", required=True, gt=0),
        # null: the optimizer's own (0 for adam and sgd, 0.01 for adamw)
        "weight_decay": Key("float", none=True, ge=0, default=None),
        "momentum": Key("float", ge=0, default=0.9),  # sgd only
        "nesterov": Key("bool", default=False),  # sgd only
    }, required=True),
    "schedule": Section({
        "name": Key("str", required=True, choices=("cosine", "poly", "step", "none")),
        "min_lr": Key("float", ge=0, default=0.0), "power": Key("float", gt=0, default=0.9),
        "step_size": Key("int", ge=1),  # required by name=step, which has no natural period
        "gamma": Key("float", gt=0, default=0.1),
    }, none=True, default={"name": "none"}),
    # Keys without defaults here: MultiTaskLoss's own defaults apply.
    "loss": Section({
        "weighting": Key("str", choices=("fixed", "uncertainty", "dwa")),
        "weights": Key("any", none=True),  # {task: weight}, a list, or null (all 1)
        "normals": Key("str", choices=("cosine", "l1")),
        "aux_weight": Key("float", ge=0),
        "temperature": Key("float", gt=0),
        "edge_pos_weight": Key("float", ge=0),
    }, none=True, default={}),
    "train": Section({
        "epochs": Key("int", ge=1, default=1),
        "amp": Key("str", none=True, choices=("bf16", "fp16"), default=None),
        "grad_clip": Key("float", none=True, gt=0, default=None),
        "log_every": Key("int", ge=1, default=20),
        "save_images": Key("int", ge=0, default=4),
        "max_steps_per_epoch": Key("int", none=True, ge=1, default=None),
        "find_unused_parameters": Key("bool", default=False),
    }, default={}),
    "eval": Section({
        # delta_m or task/metric; checked against the tasks when the run is built
        "best_metric": Key("str", default="delta_m"),
        "baselines": Key("path", none=True, default=None),  # single-task results, for delta_m
        "edge_thresholds": Key("int", ge=1, default=99),
        "original_resolution": Key("bool", default=False),
        # after every `every`-th epoch, each of the last `final_epochs` and always the last one
        "every": Key("int", ge=1, default=1),
        "final_epochs": Key("int", ge=0, default=0),
        # depth errors over all valid pixels of the set, or per image then averaged over images
        "depth_average": Key("str", choices=("pixel", "image"), default="pixel"),
    }, none=True, default={}),
})

# Keys that moved: a config still using the old name is told the new one; a config stored in an
# older checkpoint is read with :func:`migrate`, so the run still resumes.
MOVED = {"train.eval_every": "eval.every"}


def migrate(cfg: dict) -> dict:
    """A copy of ``cfg`` with every key of :data:`MOVED` under its new name."""
    cfg = copy.deepcopy(cfg)
    for old, new in MOVED.items():
        *old_path, old_key = old.split(".")
        node = cfg
        for part in old_path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_key not in node:
            continue
        value = node.pop(old_key)
        *new_path, new_key = new.split(".")
        target = cfg
        for part in new_path:
            target = target.setdefault(part, {})
        target.setdefault(new_key, value)
    return cfg

_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "path": ("a path (string)", lambda v: isinstance(v, (str, os.PathLike))),
    "list": ("a list", lambda v: isinstance(v, (list, tuple))),
    "dict": ("a mapping", lambda v: isinstance(v, dict)),
    "any": ("anything", lambda v: True),
}


def _expected(spec: Key) -> str:
    if spec.choices:
        what = "one of " + ", ".join(repr(c) for c in spec.choices)
    else:
        what = _KINDS[spec.kind][0]
        if spec.ge is not None:
            what += f" >= {spec.ge:g}"
        if spec.gt is not None:
            what += f" > {spec.gt:g}"
    return what + (" or null" if spec.none else "")


def _check_key(dotted: str, v: Any, spec: Key) -> Optional[str]:
    if v is None:
        return None if spec.none else f"{dotted} must be {_expected(spec)}, got null"
    ok = _KINDS[spec.kind][1](v)
    if ok and spec.choices:
        ok = isinstance(v, str) and v.lower() in spec.choices
    if ok and spec.kind in ("int", "float"):
        ok = (spec.ge is None or v >= spec.ge) and (spec.gt is None or v > spec.gt)
    return None if ok else f"{dotted} must be {_expected(spec)}, got {v!r}"


def _check_section(prefix: str, node: Any, sec: Section, errors: list) -> None:
    name = prefix or "the config"
    if node is None:
        if not sec.none:
            errors.append(f"{name} must be a mapping (a section), got null")
        return
    if not isinstance(node, dict):
        errors.append(f"{name} must be a mapping (a section with keys {sorted(sec.keys)}), "
                      f"got {type(node).__name__} {node!r}")
        return
    for k, v in node.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        spec = sec.keys.get(k)
        if spec is None:
            if not sec.open:
                close = difflib.get_close_matches(str(k), list(sec.keys), n=3, cutoff=0.6)
                hint = f"; did you mean {' or '.join(repr(prefix + '.' + c if prefix else c) for c in close)}?" \
                    if close else ""
                if dotted in MOVED:
                    hint = f"; it is {MOVED[dotted]!r} now"
                errors.append(f"unknown config key {dotted!r}{hint} (known in {name}: {sorted(sec.keys)})")
        elif isinstance(spec, Section):
            _check_section(dotted, v, spec, errors)
        else:
            err = _check_key(dotted, v, spec)
            if err:
                errors.append(err)
    for k, spec in sec.keys.items():
        if spec.required and k not in node:
            errors.append(f"{prefix + '.' if prefix else ''}{k} is required but missing")


def validate(cfg: Any) -> dict:
    """Check a whole (merged, overridden) config against :data:`SCHEMA`; raise :class:`ConfigError`
    listing every problem (dotted key, value, what was expected). Returns ``cfg`` unchanged."""
    errors: list = []
    _check_section("", cfg, SCHEMA, errors)
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))
    return cfg


def _fill(node: dict, sec: Section) -> dict:
    for k, spec in sec.keys.items():
        if isinstance(spec, Section):
            if node.get(k) is None and spec.default is not None:
                node[k] = copy.deepcopy(spec.default)
            if isinstance(node.get(k), dict):
                _fill(node[k], spec)
        elif k not in node and spec.default is not NO_DEFAULT:
            node[k] = copy.deepcopy(spec.default)
    return node


def _copy_tree(node: Any) -> Any:
    # Mappings and lists are copied, other values shared: a config may hold state dicts
    # (model.single_task_weights) that are not worth copying.
    if isinstance(node, dict):
        return {k: _copy_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy_tree(v) for v in node]
    return node


def with_defaults(cfg: dict) -> dict:
    """A copy of ``cfg`` with the :data:`SCHEMA` default of every key it leaves out (and of every
    section it leaves out or sets to null, where the section has one). Values it sets, null ones
    included, stay; so does everything the schema does not know. Idempotent, and a partial config
    (e.g. only ``data``) gets the defaults of what it has."""
    return _fill(_copy_tree(cfg), SCHEMA)


def defaults(sec: Section = SCHEMA, prefix: str = "") -> dict:
    """``{"train.epochs": 1, ...}``: every dotted key with a default, and the default."""
    out = {}
    for k, spec in sec.keys.items():
        dotted = f"{prefix}.{k}" if prefix else k
        if isinstance(spec, Section):
            if spec.default is not None:
                out[dotted] = copy.deepcopy(spec.default)
            out.update(defaults(spec, dotted))
        elif spec.default is not NO_DEFAULT:
            out[dotted] = copy.deepcopy(spec.default)
    return out


def output_dir(cfg: dict, override: Optional[str | Path] = None) -> Path:
    """Where a run writes: ``override`` (``--output-dir``), else ``output_dir``, else outputs/<name>."""
    return Path(override or cfg.get("output_dir") or f"outputs/{cfg.get('name') or 'run'}")
