"""Typed configs, declared once per field: default, help, bounds, and whether the field determines the output.

Every config dataclass of kmim declares each field with `output_field(...)` (the value changes what the command
writes, so it is part of the fingerprint) or `execution_field(...)` (batch sizes, worker counts, CPUs/GPUs per
worker, retries, memory limits, loader workers, checkpoint cadence: how the work is done, never what it
makes). Everything else is derived from that one declaration:

- `fingerprint_config(cfg)`: the output-determining part of a config, the only config that enters a stage's
  fingerprint, both in the stage itself (`claim_output`) and in `kmim run`. A file named by a field (a
  weights file, initial centers) enters by the sha256 of its bytes, never by its path.
- `build_config(cls, values, where)`: a config from a recipe section, a saved `config.json` or CLI values,
  with type checks, legacy names (`aliases`) accepted, and one error per bad key naming it.
- `check_fields(cfg)`: the declared bounds (`ge`, `gt`, `le`, `lt`, `choices`), one condition per message.
- the CLI options of every command that takes a flat config (kmim/cli/options.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, get_type_hints

from kmim.errors import ConfigError

ROLE = "kmim_role"  # "output" | "execution"
HELP = "kmim_help"
ALIASES = "kmim_aliases"  # earlier names of the field, still read from recipes and saved configs
BOUNDS = "kmim_bounds"
FOLDED = (
    "kmim_folded"  # enters the fingerprint through the config's fingerprint_extra() (e.g. by content hash)
)
DERIVED = "kmim_derived"  # filled in by the stage itself, not a user setting (no CLI option)
# Added after outputs were made without it: in the fingerprint only when set away from its default, so every
# output made before the field existed keeps its fingerprint (and is reused, not redone).
ADDED = "kmim_added"


def _field(
    role: str,
    default: Any,
    default_factory: Any,
    help: str,
    aliases: tuple[str, ...],
    bounds: dict,
    folded: bool,
    derived: bool,
    added: bool = False,
) -> Any:
    metadata = {
        ROLE: role,
        HELP: help,
        ALIASES: tuple(aliases),
        BOUNDS: bounds,
        FOLDED: folded,
        DERIVED: derived,
        ADDED: added,
    }
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def output_field(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Any = MISSING,
    aliases: tuple[str, ...] = (),
    folded: bool = False,
    derived: bool = False,
    added: bool = False,
    **bounds: Any,
) -> Any:
    """A field that changes what is written: part of the fingerprint.

    folded: the value enters through the config's `fingerprint_extra()` instead of as itself (a file path
    that enters by the sha256 of its bytes). derived: filled in by the stage, not a user setting. added: a
    field new since outputs were made without it; it enters the fingerprint only away from its default."""
    return _field("output", default, default_factory, help, aliases, bounds, folded, derived, added)


def execution_field(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Any = MISSING,
    aliases: tuple[str, ...] = (),
    **bounds: Any,
) -> Any:
    """A field that changes only how the work is done (speed, memory, retries): never in a fingerprint."""
    return _field("execution", default, default_factory, help, aliases, bounds, False, False)


def is_execution(f: dataclasses.Field) -> bool:
    return f.metadata.get(ROLE) == "execution"


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get(HELP, "")


# --- the fingerprint -------------------------------------------------------------------------------


def fingerprint_config(cfg: Any) -> dict:
    """The output-determining fields of `cfg` (nested configs recursively), as plain JSON values.

    Execution-only fields are left out. `folded` fields enter through the config's `fingerprint_extra()`:
    a weights file or initial centers by the sha256 of their bytes, never by their path, so moving the file
    changes nothing and replacing its bytes changes the fingerprint (extract: the extractor spec with its
    weights hash; cluster: `init_from_sha256`).
    """
    out: dict[str, Any] = {}
    for f in fields(cfg):
        if is_execution(f) or f.metadata.get(FOLDED):
            continue
        value = getattr(cfg, f.name)
        if f.metadata.get(ADDED) and value == f.default:
            continue
        out[f.name] = fingerprint_config(value) if is_dataclass(value) else _plain(value)
    extra = getattr(cfg, "fingerprint_extra", None)
    if extra is not None:
        out.update(extra())
    return out


def legacy_config(cfg: Any) -> dict:
    """The whole config under the field names of kmim 0.1 (each field's first alias), as `asdict` wrote it.

    `kmim run` 0.1 fingerprinted this dict, execution-only fields included: run roots made then are found
    through it (kmim/lineage/runner.py)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get(ADDED) and value == f.default:
            continue  # kmim 0.1 had no such field
        name = (f.metadata.get(ALIASES) or (f.name,))[0]
        out[name] = legacy_config(value) if is_dataclass(value) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_json(cfg: Any) -> dict:
    """Every field under its current name (what `config.json` holds)."""
    return dataclasses.asdict(cfg)


# --- validation ------------------------------------------------------------------------------------


def check_fields(cfg: Any, where: str = "") -> None:
    """The declared bounds of every field; the first violated one raises, naming the key and the rule."""
    prefix = f"{where}." if where else ""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        bounds = f.metadata.get(BOUNDS) or {}
        if value is None or not bounds:
            continue
        name = f"{prefix}{f.name}"
        if "choices" in bounds:
            if value not in bounds["choices"]:
                allowed = ", ".join(str(c) for c in bounds["choices"])
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        for rule, limit in bounds.items():
            ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[rule]
            if not ok:
                sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[rule]
                raise ConfigError(f"{name} must be {sign} {limit}, got {value!r}")


class Config:
    """Base of kmim's config dataclasses: checks the declared bounds on construction."""

    def __post_init__(self) -> None:
        check_fields(self, getattr(self, "SECTION", ""))


# --- building from recipes, saved configs and the CLI ----------------------------------------------


def aliases_of(cls: type) -> dict[str, str]:
    """Earlier field names -> current names."""
    return {alias: f.name for f in fields(cls) for alias in f.metadata.get(ALIASES, ())}


def build_config(cls: type, values: dict, where: str) -> Any:
    """`cls` from a mapping (recipe section, saved config.json, CLI values): unknown keys, wrong types and
    bounds are refused with the key named; earlier names of renamed fields are read as the new ones."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    renamed = aliases_of(cls)
    values = {renamed.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
            kwargs[name] = build_config(typ, value, f"{where}.{name}")
        else:
            kwargs[name] = check_type(value, typ, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:  # say which file / section the bad value came from
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def check_type(value: Any, typ: Any, where: str) -> Any:
    """Numbers where numbers are declared. YAML 1.1 reads `1e-3` (no dot) as a string: accept that as a float."""
    allowed = set(getattr(typ, "__args__", ())) or {typ}
    if value is None or isinstance(value, bool) and bool in allowed:
        return value
    if bool in allowed and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if float in allowed and isinstance(value, (int, float)):
        return float(value) if not isinstance(value, bool) else value
    if float in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if int in allowed and not isinstance(value, int) or int in allowed and isinstance(value, bool):
        if not (str in allowed and isinstance(value, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value
