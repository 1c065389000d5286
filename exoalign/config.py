"""Typed config: dataclasses loaded from YAML and overridden by ``section.key=value`` on the command line.

Every stage describes its settings as (nested) dataclasses. Each field is documented once, by the string
literal that follows it in the class body (an attribute docstring); :func:`field_help` reads those strings
for ``--help``. YAML files use the same field names as the dataclasses; unknown keys, wrong types and values
that a dataclass's ``__post_init__`` rejects raise :class:`~exoalign.errors.ConfigError` naming the file, the
line and the key.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError, InputError
from .fileio import atomic_write

T = TypeVar("T")

_MISSING_FILE_FIX = "check the path given to --config"


# ----------------------------------------------------------------------------------------------- docs
def field_help(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` to the docstring written under it in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Rows ``(dotted key, default, help)`` for every leaf field of a (nested) config dataclass."""
    rows = []
    docs = field_help(cls)
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        tp = hints.get(f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, repr(value), docs.get(f.name, "")))
    return rows


# ------------------------------------------------------------------------------------------ coercion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: dict) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where`` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError("value must be null", **where)
    if origin is typing.Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads bare no/off/yes/on as booleans; map them back to the spelling the choices use.
            spelled = [a for a in args if isinstance(a, str) and a.lower() in (
                ("yes", "on", "true") if value else ("no", "off", "false"))]
            if spelled:
                return spelled[0]
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(
            f"must be one of {', '.join(map(repr, args))} (got {value!r})", **where, fix=f"use one of {list(args)}"
        )
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"must be a list (got {value!r})", **where, fix="write a YAML list, e.g. [a, b]")
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"must be a mapping (got {value!r})", **where, fix="write a YAML mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"must be true or false (got {value!r})", **where, fix="write true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"must be an integer (got {value!r})", **where, fix="write a whole number")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"must be an integer (got {value!r})", **where, fix="write a whole number") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"must be an integer (got {value!r})", **where, fix="write a whole number")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"must be a number (got {value!r})", **where, fix="write a number such as 0.1")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"must be a number (got {value!r})", **where, fix="write a number such as 0.1") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"must be a string (got {value!r})", **where, fix="write a plain string")
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------- YAML
def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Map dotted keys of a composed YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + str(k.value)
            if key in lines:
                # YAML would silently keep the last value: a pasted-twice key is almost always a mistake.
                raise ConfigError("duplicate key", line=k.start_mark.line + 1, field=key,
                                  fix=f"keep one '{key}' (the other is on line {lines[key]})")
            lines[key] = k.start_mark.line + 1
            lines.update(_key_lines(v, key + "."))
    return lines


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a YAML mapping safely; return it with the line number of every dotted key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", file=str(path), fix=_MISSING_FILE_FIX)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason})", file=str(path), fix="save the file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(
            f"YAML tag not allowed ({e.problem}); configs are read with yaml.safe_load, which builds plain values only",
            file=str(path), line=mark.line + 1 if mark is not None else None,
            fix="remove the !!tag and write a plain value",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=str(path), line=line, fix="fix the YAML syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping of keys to values", file=str(path), line=1)
    try:
        lines = _key_lines(node)
    except ConfigError as e:
        e.file = str(path)
        e.args = (str(e),)
        raise
    return data, lines


#: Names users bring from other trainers (HF Trainer, TRL) → the field that means the same here.
ALIASES = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs",
    "model_name_or_path": "name_or_path", "beta": "beta_pi", "loss_type": "name",
    "warmup": "warmup_steps", "lr_scheduler_type": "scheduler", "dataset": "train_file", "train_data": "train_file",
    "adam_epsilon": "adam_eps", "bf16": "mixed_precision", "output": "output_dir",
}


def _leaves(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf field of a (nested) config dataclass."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        if dataclasses.is_dataclass(tp):
            out.extend(_leaves(tp, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def _elsewhere(key: str, root: type | None) -> str | None:
    """The dotted key of another section that ``key`` (its last part) most likely means: ``lr`` → ``train.lr``."""
    if root is None:
        return None
    leaves = [k for k in _leaves(root) if "." in k]
    if not leaves:
        return None
    name = key.rsplit(".", 1)[-1].replace("-", "_")
    by_name: dict[str, str] = {}
    for leaf in leaves:
        by_name.setdefault(leaf.rsplit(".", 1)[-1], leaf)
    for candidate in (name, ALIASES.get(name.lower())):
        if candidate in by_name and by_name[candidate] != key:
            return by_name[candidate]
    close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.75)
    return by_name[close[0]] if close and by_name[close[0]] != key else None


def _unknown_key(key: str, choices: list[str], where: dict, root: type | None = None,
                 cls: type | None = None) -> ConfigError:
    """Unknown ``key``: the section's own hint (``cls.unknown_key_hint``), else the key of the same section that
    it is another name for (``loss.beta`` → ``beta_pi``), else a close key of the same section, else the dotted
    key of another section that it names (``lr`` → ``train.lr``, ``learning_rate`` → ``train.lr``), else list
    the section's keys."""
    name = key.rsplit(".", 1)[-1]
    hint = getattr(cls, "unknown_key_hint", None)
    hint = hint(name) if callable(hint) else None
    if hint:
        return ConfigError("unknown config key", **where, fix=hint)
    alias = ALIASES.get(name.lower().replace("-", "_"))
    close = [alias] if alias in choices else difflib.get_close_matches(name, choices, n=1)
    other = None if close else _elsewhere(key, root)
    if close:
        fix = f"did you mean '{close[0]}'?"
    elif other:
        fix = f"did you mean '{other}'?"
    else:
        fix = f"valid keys here: {', '.join(choices)}"
    return ConfigError("unknown config key", **where, fix=fix)


def _build(cls: type[T], data: dict, prefix: str, src: str | None, lines: dict[str, int],
           root: type | None = None) -> T:
    root = root or cls
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        where = {"file": src, "line": lines.get(dotted), "field": dotted}
        if key not in names:
            raise _unknown_key(dotted, names, where, root, cls)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError("must be a section (a mapping of keys)", **where, fix=f"write {key}: {{...}}")
            kwargs[key] = _build(tp, value, dotted + ".", src, lines, root)
        else:
            kwargs[key] = _coerce(value, tp, where)
    try:
        return cls(**kwargs)
    except InputError as e:
        # __post_init__ rejected a value: attach the location of the offending key if we know it.
        field = f"{prefix}{e.field}" if e.field and not e.field.startswith(prefix) else e.field
        raise ConfigError(e.message, file=e.file or src, line=e.line or lines.get(field or ""), field=field, fix=e.fix) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), file=src, field=prefix.rstrip(".") or None) from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML (so ``1e-6``, ``true``, ``[1, 2]`` work)."""
    if "=" not in item:
        raise ConfigError(
            f"cannot read override {item!r}",
            file="command line",
            field=item,
            fix="write overrides as key=value or section.key=value",
        )
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build config dataclass ``cls`` from a YAML file (optional) and ``key=value`` overrides.

    The overrides are applied on top of the file's values, then the whole is type-checked and validated
    (``__post_init__``). Errors name the file/line or the override that is wrong.
    """
    data: dict = {}
    lines: dict[str, int] = {}
    src = None
    if path is not None:
        src = str(path)
        data, lines = read_yaml(path)
    overridden = []
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
        overridden.append(key)
        lines[key] = None  # type: ignore[assignment]
    try:
        return _build(cls, data, "", src, lines)
    except ConfigError as e:
        field = e.field or ""
        if any(k == field or k.startswith(field + ".") or field.startswith(k + ".") for k in overridden):
            e.file, e.line = "command line", None
            e.args = (str(e),)
        raise


def from_dict(cls: type[T], data: dict, *, source: str = "config") -> T:
    """Build config dataclass ``cls`` from a nested dict with the YAML's keys (``{"loss": {"name": "exo"}}``);
    the same checks as :func:`load_config`, errors naming ``source`` and the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping of sections (got {type(data).__name__})", file=source,
                          fix='give e.g. {"loss": {"name": "exo"}, "train": {"lr": 1e-6}}')
    return _build(cls, data, "", source, {})


def to_dict(cfg: Any) -> dict:
    """A config dataclass as a plain nested dict (for YAML/JSON dumps and trackers)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically (a temp file renamed over ``path``)."""
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------- CLI
class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are :class:`ConfigError` (one ``error:`` line and exit 2 through
    ``exoalign.cli``) instead of a usage block and ``SystemExit(2)``. ``--help`` still prints and exits 0."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message, file="command line", fix=f"see `{self.prog} --help`")


def _flags_to_overrides(argv: list[str], known: set[str]) -> list[str]:
    """Rewrite ``--key value`` and ``--key=value`` (dashes read as underscores) into ``key=value`` overrides,
    leaving the parser's own options (``known``) alone; a bare ``--flag`` means ``flag=true``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2 and arg.split("=", 1)[0] not in known:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                # The next word is this flag's value unless it is another flag or a key=value override.
                if nxt is not None and not nxt.startswith("--") and not re.match(r"^[A-Za-z_][\w.]*=", nxt):
                    value, i = nxt, i + 1
                else:
                    value = "true"  # a bare flag: --overwrite
            out.append(f"{key.replace('-', '_')}={value}")
        else:
            out.append(arg)
        i += 1
    return out


class ConfigArgumentParser(ArgumentParser):
    """The parser of a config-driven command: ``[--config FILE] [key=value …]``, where any config key may also be
    written ``--key value`` or ``--key=value`` (``--train.max-steps 5`` = ``train.max_steps=5``)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(_flags_to_overrides(argv, set(self._option_string_actions)), namespace)


def config_parser(prog: str, cls: type, description: str = "") -> ConfigArgumentParser:
    """A parser taking ``--config FILE`` and trailing ``key=value`` overrides (also ``--key value``); ``--help``
    lists every config key with its default and docstring. Usage errors raise :class:`ConfigError`."""
    rows = describe(cls)
    width = max((len(k) for k, _, _ in rows), default=10)
    epilog = "config keys (YAML, key=value or --key value):\n" + "\n".join(
        f"  {k:<{width}}  {h} (default {d})" for k, d, h in rows
    )
    p = ConfigArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", "-c", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value or section.key=value overrides (or --key value)")
    return p


def parse_config_args(prog: str, cls: type[T], argv: list[str] | None, description: str = "") -> T:
    """Parse ``[--config FILE] [key=value | --key value …]`` and return the loaded, validated config."""
    args = config_parser(prog, cls, description).parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def require(cond: bool, field: str, message: str, fix: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError on ``field`` unless ``cond``."""
    if not cond:
        raise ConfigError(message, field=field, fix=fix)


def stage_args(prog: str, cls: type[T], argv: list[str] | None, description: str = "") -> T:
    """Parse ``[--config FILE] [key=value …]`` for a stage config, also accepting ``--key value`` and
    ``--key=value`` (dashes read as underscores), so ``exoalign score --oracle m:f`` works like
    ``exoalign score oracle=m:f``. Returns the loaded, validated config (see :func:`parse_config_args`, which
    every config-driven command shares)."""
    return parse_config_args(prog, cls, argv, description)
