"""Experiment configuration files: YAML validated against the schema (harness/schema.py), dotted
command-line overrides, grids, and the methods' own parameters.

A config file holds one experiment; it may also hold a `grid` (axes of dotted keys, each with a list of
values) and `tune` settings, which turn it into a sweep. Every mistake becomes a `ConfigError` naming
the offending field or file; the CLI prints it as one line and exits with status 2.
"""
from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from harness.errors import ConfigError, UserError
from harness.registry import available_methods, method_class
from harness.schema import (DATASETS, MODELS, PAPER_TIERS, ClientsConfig, DataConfig, DevicesConfig,  # noqa: F401
                            EngineConfig, ExecutorGroup, ExperimentConfig, MethodConfig, ModelConfig, SplitConfig,
                            Strict, SweepFile, Tier, TrainConfig, TuneConfig, check_name)


# ---------------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not a text file (expected a YAML config)") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(str(path), f"not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the top level must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError("--set", f"expected KEY=VALUE with a dotted key, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-2 as a string
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(key, f"{part!r} is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def _raise_validation(err: ValidationError, prefix: str = "") -> None:
    errors = err.errors()
    # Of a union's alternatives (`availability`: a string or a mapping), the one the value was meant
    # for: not the one whose type it does not have at all.
    mismatch = ("string_type", "int_type", "float_type", "bool_type", "dict_type", "list_type", "literal_error")
    first = sorted(errors, key=lambda e: e["type"] in mismatch)[0]
    union_tags = {str(p) for e in errors for p in e["loc"] if isinstance(p, str) and ("[" in p or p in (
        "str", "int", "float", "bool"))} if len(errors) > 1 else set()
    first = dict(first, loc=tuple(p for p in first["loc"] if str(p) not in union_tags))
    loc = ".".join(str(p) for p in first["loc"])
    field = ".".join(x for x in (prefix, loc) if x) or prefix or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    named = re.match(r"([A-Za-z_][\w.]*): (.*)", msg)
    if named and first["type"] == "value_error":  # a check of a section names its field in its message
        field, msg = ".".join(x for x in (prefix, loc, named.group(1)) if x), named.group(2)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    raise ConfigError(field, msg + more) from None


def validate_experiment(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a plain experiment mapping against the schema (the method's own parameters are
    validated once, when the experiment is resolved: harness/spec.py)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        _raise_validation(e)


def method_params(cfg: ExperimentConfig):
    """The validated parameters of the experiment's method."""
    try:
        return method_class(cfg.method.name).Params.model_validate(cfg.method.params())
    except ValidationError as e:
        _raise_validation(e, prefix="method")


def split_sweep(raw: dict[str, Any]) -> tuple[dict[str, Any], SweepFile]:
    base = {k: v for k, v in raw.items() if k not in ("grid", "tune")}
    try:
        sweep = SweepFile.model_validate({k: raw[k] for k in ("grid", "tune") if k in raw})
    except ValidationError as e:
        _raise_validation(e)
    for axis, values in sweep.grid.items():
        if not values:
            raise ConfigError(f"grid.{axis}", "an axis needs at least one value")
    return base, sweep


def _dict_axis(grid: dict[str, list[Any]], key: str) -> tuple[str | None, str]:
    for axis, entries in grid.items():
        if key.startswith(axis + ".") and all(isinstance(e, dict) for e in entries):
            return axis, key[len(axis) + 1:]
    return None, ""


def _is_list_type(annotation: Any) -> bool:
    return get_origin(annotation) in (list, tuple, set) or any(_is_list_type(a) for a in get_args(annotation))


def _takes_list(key: str, methods: set[str]) -> bool:
    """Whether the field at dotted `key` itself holds a list (`devices.tiers`, PruneFL's
    `method.dense_layers`), so that a list given for it is one value, not several."""
    parts = key.split(".")
    if parts[0] == "method" and len(parts) == 2 and parts[1] != "name":
        fields = []
        for name in sorted(methods):
            try:
                fields.append(method_class(name).Params.model_fields.get(parts[1]))
            except UserError:  # an unknown method fails validation later, naming method.name
                pass
        return any(f is not None and _is_list_type(f.annotation) for f in fields)
    model: Any = ExperimentConfig
    for i, part in enumerate(parts):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        if i == len(parts) - 1:
            return _is_list_type(field.annotation)
        model = field.annotation
    return False


def _methods_named(base: dict[str, Any], grid: dict[str, list[Any]], overrides) -> set[str]:
    """Every method the experiments may use: the registered ones and those the config, its grid and
    the overrides name (a strategy given by import path)."""
    names = [_get(base, "method.name") or "fedavg", *grid.get("method.name", [])]
    names += [e.get("name") for e in grid.get("method", []) if isinstance(e, dict)]
    for key, value in overrides:
        if key == "method.name":
            names += value if isinstance(value, list) else [value]
    return set(available_methods()) | {str(n) for n in names if n is not None}


def apply_overrides(base: dict[str, Any], grid: dict[str, list[Any]], overrides) -> None:
    """--set semantics. A key that is a grid axis replaces the axis by the one value. A key inside the
    dict entries of an axis (`method.name` for an axis of methods) first keeps the entries that already
    have that value; if none has, it is set in every entry. Any other key sets the base experiment.
    Selections go before settings, so `--set method.interval=2 --set method.name=prunefl` works in
    either order.

    A list given for a field that takes one value (`--set seed=[4,5,6]`) means several values: on a
    grid axis it replaces the axis by them; inside the entries of a dict axis it keeps the entries
    holding any of them; elsewhere it makes a new axis. A list for a field that holds a list
    (`devices.tiers`) stays one value."""
    overrides = list(overrides)
    methods = _methods_named(base, grid, overrides)
    settings = []
    for key, value in overrides:
        many = isinstance(value, list) and not _takes_list(key, methods)
        if many:
            if not value:
                raise ConfigError(key, "an empty list of values gives no experiment")
            if any(v in value[:i] for i, v in enumerate(value)):
                raise ConfigError(key, f"the list {value} repeats a value")
        values = value if many else [value]
        if key in grid:
            grid[key] = list(values)
            continue
        axis, sub = _dict_axis(grid, key)
        kept = [e for e in grid[axis] if _get(e, sub) in values] if axis else []
        if kept:
            grid[axis] = kept
        elif many:
            grid[key] = list(values)
        else:
            settings.append((key, value))
    for key, value in settings:
        axis, sub = _dict_axis(grid, key)
        if axis is None:
            set_dotted(base, key, value)
            continue
        entries = []
        for entry in grid[axis]:
            set_dotted(entry, sub, value)
            if entry not in entries:
                entries.append(entry)
        grid[axis] = entries


def axis_label(value: Any) -> str:
    if isinstance(value, dict):
        head = [str(value["name"])] if "name" in value else []
        rest = [f"{k}-{axis_label(v)}" for k, v in sorted(value.items()) if k != "name"]
        return "-".join(head + rest)
    if isinstance(value, float):
        return f"{value:g}"
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(value)).strip("-")


def experiment_name(tree: dict[str, Any], varying: list[str]) -> str:
    """`<name>_<labels of the other varying axes>_seed<seed>`: the seed is always in the name, so that a
    new seed added to an output folder is a new experiment, not one already finished. A trailing
    `_seed<n>` of the configured name is dropped first, so the config.yaml of a result folder
    reproduces its name (and, with another seed, names that seed)."""
    base = re.sub(r"_seed\d+$", "", str(tree.get("name", ExperimentConfig.model_fields["name"].default)))
    seed = tree.get("seed", ExperimentConfig.model_fields["seed"].default)
    return "_".join([base, *varying, f"seed{axis_label(seed)}"])


def expand(raw: dict[str, Any], overrides: list[tuple[str, Any]] = ()) -> tuple[list[ExperimentConfig], SweepFile]:
    """Expand a config mapping and its overrides into validated experiments (one per grid point).
    Overrides of `tune.*` keys set the sweep's Tune settings."""
    raw = copy.deepcopy(raw)
    tune_overrides = [(k, v) for k, v in overrides if k.startswith("tune.")]
    overrides = [(k, v) for k, v in overrides if not k.startswith("tune.")]
    for key, value in tune_overrides:
        set_dotted(raw, key, value)
    base, sweep = split_sweep(raw)
    base = copy.deepcopy(base)
    grid = copy.deepcopy(sweep.grid)
    apply_overrides(base, grid, overrides)
    axes = list(grid)
    experiments: list[ExperimentConfig] = []
    names: set[str] = set()
    for axis in axes:
        repeated = next((v for i, v in enumerate(grid[axis]) if v in grid[axis][:i]), None)
        if repeated is not None:
            raise ConfigError(f"grid.{axis}", f"the value {repeated!r} appears twice: a grid point must not repeat")
    trees: list[dict[str, Any]] = []
    for point in itertools.product(*(grid[a] for a in axes)):
        tree = copy.deepcopy(base)
        for axis, value in zip(axes, point):
            if isinstance(value, dict) and isinstance(_get(tree, axis), dict):
                merged = {} if "name" in value else copy.deepcopy(_get(tree, axis))
                merged.update(copy.deepcopy(value))
                value = merged
            set_dotted(tree, axis, copy.deepcopy(value))
        if tree in trees:
            raise ConfigError("grid", f"two grid points give the same experiment ({', '.join(f'{a}={v!r}' for a, v in zip(axes, point))})"
                                      f": a grid point must not repeat")
        trees.append(copy.deepcopy(tree))
        name = experiment_name(tree, [axis_label(v) for a, v in zip(axes, point) if len(grid[a]) > 1 and a != "seed"])
        if name in names:
            raise ConfigError("grid", f"two grid points are both named {name!r} (their values differ but print the "
                                      f"same); make the values distinct")
        names.add(name)
        tree["name"] = name
        experiments.append(validate_experiment(tree))
    return experiments, sweep.model_copy(update={"grid": grid})


def _get(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def load(path: str | Path, overrides: list[str] = (), out: str | None = None):
    raw = read_yaml(path)
    parsed = [parse_override(o) for o in overrides]
    if out is not None:
        parsed.append(("out", out))
    return expand(raw, parsed)


# ---------------------------------------------------------------------------------------------------
# Paths of this machine

def _path_fields(cfg: ExperimentConfig):
    """(section, field, value) of every setting that names a file: an npz data set and the traces."""
    if cfg.data.dataset.startswith("npz:"):
        yield cfg.data, "dataset", cfg.data.dataset[4:]
    for name in ("trace", "availability_trace"):
        if getattr(cfg.devices, name):
            yield cfg.devices, name, getattr(cfg.devices, name)


def with_absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with its files named by absolute paths, so that they are found from any working folder
    (Tune runs each trial in a folder of its own)."""
    cfg = cfg.model_copy(deep=True)
    for section, field, value in _path_fields(cfg):
        path = str(Path(value).expanduser().resolve())
        setattr(section, field, f"npz:{path}" if field == "dataset" else path)
    return cfg


def portable(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as results record it: without `out` and with files named by their file
    name only, so that a results folder carries no path of the machine that made it."""
    cfg = cfg.model_copy(deep=True)
    for section, field, value in _path_fields(cfg):
        name = Path(value).name
        setattr(section, field, f"npz:{name}" if field == "dataset" else name)
    return cfg.model_dump(mode="json", exclude={"out"})
