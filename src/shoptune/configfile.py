"""Config files (YAML mappings) and ``key=value`` overrides, validated by a pydantic model, with
errors a user can act on: one line per problem, no pydantic URL::

    configs/train/x.yaml:7: lora.r: Input should be greater than or equal to 1 (got 0)
    override 'learning_rate=-1': learning_rate: Input should be greater than 0 (got -1)
    override '=5': the key is empty (expected key=value)

Shared by training configs, mixtures, synthesis specs and experiment files.
"""
from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used: one line per problem (``where: field: why (got X)``)."""


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(getattr(e, "problem", None) or e).split())


MAX_YAML_NODES = 100_000  # values (scalars, lists, mappings) of a config with aliases expanded


def _expanded_nodes(root: yaml.Node) -> int:
    """How many nodes ``root`` stands for with every alias expanded (an alias is the node it
    names, shared: counted once per use, computed once). ValueError for an alias inside the node
    it names (a recursive structure)."""
    memo: dict[int, int] = {}
    open_: set[int] = set()

    def count(n: yaml.Node) -> int:
        k = id(n)
        if k in memo:
            return memo[k]
        if k in open_:
            raise ValueError("an alias refers to a node that contains it (a recursive structure)")
        open_.add(k)
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(count(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(count(a) + count(b) for a, b in n.value)
        else:
            total = 1
        open_.discard(k)
        memo[k] = total
        return total
    return count(root)


class _TooLarge(ValueError):
    pass


def _load_bounded(text: str) -> tuple[Any, yaml.Node | None]:
    """(value, node) of the YAML ``text`` by the safe loader, aliases expanded only within
    :data:`MAX_YAML_NODES`: yaml.YAMLError as PyYAML raises it, ValueError for a recursive
    alias or an alias bomb, RecursionError for nesting too deep for the parser."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node) > MAX_YAML_NODES:
            raise _TooLarge(f"its aliases (*name) expand to more than {MAX_YAML_NODES:,} values "
                            "(an alias bomb?); refused")
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def load_yaml(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """The value in the YAML ``text`` and its node (safe loader), bounded: aliases are expanded
    only while the whole stays within :data:`MAX_YAML_NODES` values (a "billion laughs" file is
    refused before it is built), a recursive alias or nesting too deep for the parser is
    refused. ConfigError names ``where`` (and the line for broken YAML)."""
    try:
        return _load_bounded(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise ConfigError(f"{at}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path: str | Path, what: str = "config") -> tuple[dict, dict[tuple, int]]:
    """The mapping in ``path`` and the 1-based line of every key in it (by key path, list items
    by index). Read bounded (:func:`shoptune._io.read_input_text`: a regular file of at most
    1 MiB, ``SHOPTUNE_MAX_CONFIG_BYTES``; :func:`load_yaml`: aliases within a node budget).
    ConfigError names ``path:LINE`` for broken YAML, ``path`` for an empty file or one that is
    not a mapping; FileNotFoundError / IsADirectoryError as ``open`` raises them."""
    from shoptune._io import InputError, read_input_text

    p = Path(path)
    try:
        text = read_input_text(p, what)
    except InputError as e:
        raise ConfigError(str(e)) from None
    data, node = load_yaml(text, str(p))
    if data is None:
        raise ConfigError(f"{p}: empty {what} (a YAML mapping of settings is wanted)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}:{node.start_mark.line + 1}: a {what} must be a YAML mapping "
                          f"(key: value lines), not a {type(data).__name__}")
    lines: dict[tuple, int] = {}

    def walk(n, at: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = at + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[at + (i,)] = v.start_mark.line + 1
                walk(v, at + (i,))
    walk(node, ())
    return data, lines


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """``a.b=VALUE`` -> (("a", "b"), VALUE parsed as YAML: 32, true, [a, b], null)."""
    parts, value = _parse_override(item)
    return parts, copy.deepcopy(value)  # (the cached value is never handed out to be changed)


@lru_cache(maxsize=4096)  # an experiment's runs share most of their overrides
def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, raw = item.partition("=")
    parts = tuple(k.strip() for k in key.split("."))
    if not sep:
        raise ConfigError(f"override {item!r}: expected key=value")
    if not all(parts):
        raise ConfigError(f"override {item!r}: the key {'is empty' if not key.strip() else 'has an empty part'} "
                          "(expected key=value, e.g. lora.r=32)")
    try:
        value, _ = _load_bounded(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: {'.'.join(parts)}: not a YAML value "
                          f"({_yaml_problem(e)})") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"override {item!r}: {'.'.join(parts)}: "
                          f"{e if isinstance(e, ValueError) else 'nested too deeply to read'}") from None
    return parts, value


def apply_overrides(data: dict, items) -> dict:
    """Set each ``key=value`` of ``items`` in ``data`` (nested by dots); returns ``data``."""
    for item in items or ():
        parts, value = parse_override(item)
        d = data
        for i, p in enumerate(parts[:-1]):
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        d[parts[-1]] = value
    return data


def format_errors(where: str, err: ValidationError, data: Any = None,
                  lines: dict[tuple, int] | None = None, overridden=()) -> str:
    """One line per bad field: ``where[:LINE]: field: why (got X)``. The field is named by the
    keys of ``data`` it sits at (pydantic's union and validator tags are dropped, and a field
    failing every branch of a union is one line). ``LINE``: where the key is in the file,
    unless it (or a section above it) was set by an override (key paths ``overridden``); when
    ``overridden`` maps those key paths to the ``key=value`` items that set them, the line names
    that override instead of the file (the bad value came from the command line)."""
    merged: dict[tuple, list[str]] = {}
    got: dict[tuple, str] = {}
    for e in err.errors(include_url=False):
        at, cur = [], data
        for i, x in enumerate(e["loc"]):
            if isinstance(cur, dict) and x in cur:
                at.append(x)
                cur = cur[x]
            elif isinstance(cur, list) and isinstance(x, int) and 0 <= x < len(cur):
                at.append(x)
                cur = cur[x]
            elif (cur is data or isinstance(cur, dict)) and e["type"] == "missing" \
                    and i == len(e["loc"]) - 1:
                at.append(x)  # a required key that is not there
            elif data is None:
                at.append(x)
            else:
                continue  # a union branch or validator tag, not a key
        key = tuple(at)
        msg = e["msg"].removeprefix("Value error, ")
        if msg not in merged.setdefault(key, []):
            merged[key].append(msg)
        inp = e.get("input")
        if e["type"] != "missing" and not isinstance(inp, dict):
            got[key] = repr(inp) if len(repr(inp)) <= 80 else repr(inp)[:77] + "..."
    out = []
    for key, msgs in merged.items():
        line = None
        by = [o for o in overridden if key[:len(o)] == o]
        if by and isinstance(overridden, dict):
            place = f"override {overridden[max(by, key=len)]!r}"
        else:
            if lines and not by:
                line = next((lines[key[:n]] for n in range(len(key), 0, -1) if key[:n] in lines), None)
            place = f"{where}:{line}" if line else where
        field = ".".join(map(str, key)) or "(config)"
        out.append(f"{place}: {field}: {'; or '.join(msgs)}" + (f" (got {got[key]})" if key in got else ""))
    return "\n".join(out)


def validate(model: type[M], data: dict, where: str, lines: dict[tuple, int] | None = None,
             overridden=()) -> M:
    """``model(**data)``, or ConfigError with :func:`format_errors`'s lines."""
    try:
        return model(**data)
    except ValidationError as e:
        raise ConfigError(format_errors(where, e, data, lines, overridden)) from None


def load(model: type[M], path: str | Path | None, overrides=(), what: str = "config") -> M:
    """``model`` from the YAML file ``path`` (None: defaults) with ``key=value`` overrides."""
    data, lines = read_yaml(path, what) if path else ({}, {})
    apply_overrides(data, overrides)
    overridden = {parse_override(item)[0]: item for item in overrides or ()}  # (the last one wins)
    return validate(model, data, str(path) if path else "config", lines, overridden)


# ----------------------------------------------------------------------------- shipped configs

def shipped_dir() -> Path:
    """The configs shipped inside the package (``configs/`` in the repo links here)."""
    from shoptune import REPO_CONFIGS
    return REPO_CONFIGS


def shipped_configs() -> list[tuple[str, Path]]:
    """Every shipped config as (``KIND/NAME``, path), sorted: ``train/smoke``, ``eval/core`` ..."""
    root = shipped_dir()
    return sorted((p.relative_to(root).with_suffix("").as_posix(), p) for p in root.rglob("*.yaml"))


def describe(path: Path) -> str:
    """A shipped config's description: the first sentence of its leading comment (whole: a
    table wraps it at word boundaries), up to the first indented command line (``#   shoptune``)."""
    words = []
    from shoptune._io import read_input_text
    for line in read_input_text(path, "config").splitlines():
        if not line.startswith("#") or line.startswith("#   "):  # (an indented command line)
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    end = re.search(r"[.?]\s+(?=[A-Z`(])", text)  # (not "e.g. the")
    text = text[:end.start() + 1] if end else text
    return text[:-1] + "." if text.endswith(":") else text  # (the command it introduced is not shown)


def shipped_config(name: str | Path, kind: str | None = None) -> Path | None:
    """The shipped config ``name`` names, or None: ``configs/train/smoke.yaml``, ``train/smoke``,
    ``train/smoke.yaml``, or (given ``kind``, e.g. "train") the name inside that kind's folder:
    ``smoke``, ``smoke.yaml``, ``gpu/qwen2.5-7b-qlora``."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        return None
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    if not parts:
        return None
    rel = Path(*parts)
    rel = rel if rel.suffix in (".yaml", ".yml") else rel.with_name(rel.name + ".yaml")
    cands = [shipped_dir() / rel]
    if kind and parts[0] != kind:
        cands.insert(0, shipped_dir() / kind / rel)
    return next((c for c in cands if c.is_file()), None)


def resolve_config(path: str | Path, kind: str | None = None) -> Path:
    """``path`` as given when it exists (or is absolute: its reader names the problem); else the
    shipped config it names (so ``configs/mixtures/diverse.yaml`` works from any folder); else
    FileNotFoundError naming the path."""
    p = Path(path)
    if p.exists() or p.is_symlink() or p.is_absolute():  # (a symlink loop: its reader says so)
        return p
    found = shipped_config(p, kind)
    if found is not None:
        return found
    import errno
    raise FileNotFoundError(errno.ENOENT, "No such file or directory, nor a shipped config of "
                            "that name (`shoptune configs ls` lists them)", str(path))
