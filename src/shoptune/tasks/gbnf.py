"""An answer constraint as one GBNF grammar, the same text for every engine: the built-in engine
compiles it with llguidance, llama.cpp takes it as ``grammar``, vLLM as ``structured_outputs:
{"grammar": ...}`` (its llguidance backend). One text means the three allow exactly the same
answers (docs/results/grammar_libs.md measured why: each engine's own JSON-schema converter
allows other whitespace, and xgrammar's bounded strings let raw control characters through).

* :func:`choice`: exactly one of some strings (a label);
* :func:`ordered_subset`: a JSON list of distinct labels, in the labels' order (``labels``);
* :func:`json_schema`: JSON valid against a schema, written with ``json.dumps``' separators and
  keys in the schema's order, as training writes answers.

Every grammar allows one space before the answer (prompts end in ``Answer:``). A schema keyword
a grammar cannot enforce (``pattern``, numeric bounds, ``oneOf``, ``$ref`` ...) is refused with
:class:`GrammarError`, so a constrained answer is always valid against the schema.
"""
from __future__ import annotations

import json
import re
from typing import Any

CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
INTEGER = 'integer ::= "-"? ("0" | [1-9] [0-9]{0,17})'
NUMBER = 'number ::= integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?'
LEAD = '" "?'
# what a JSON Schema may say here: the keywords a grammar enforces, and annotations
KNOWN = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
         "minLength", "maxLength", "enum", "const", "anyOf", "title", "description", "default",
         "examples", "$schema", "$id", "$comment", "format", "deprecated", "readOnly", "writeOnly"}
MAX_REPEAT = 10_000


class GrammarError(ValueError):
    """A schema (or label set) no grammar here can enforce; the message names the keyword."""


def literal(text: str) -> str:
    """``text`` as a GBNF string literal (JSON's escapes are GBNF's)."""
    return json.dumps(text, ensure_ascii=False)


def choice(options) -> str:
    """Exactly one of ``options``."""
    return f"root ::= {LEAD} ({' | '.join(literal(o) for o in options)})\n"


def ordered_subset(labels, max_items: int | None = None) -> str:
    """A JSON list of distinct ``labels`` (none to ``max_items``), in their order: rule ``p-j-i`` =
    the list's j-th item is label i or a later one (O(n * k) rules, no subsets spelled out)."""
    n = len(labels)
    k = min(n, n if max_items is None else max_items)
    lines = [f'root ::= {LEAD} "[" (p-0-0)? "]"']
    for j in range(k):
        for i in range(j, n):
            more = f' (", " p-{j + 1}-{i + 1})?' if j + 1 < k and i + 1 < n else ""
            skip = f" | p-{j}-{i + 1}" if i + 1 < n else ""
            lines.append(f"p-{j}-{i} ::= {literal(json.dumps(labels[i], ensure_ascii=False))}{more}{skip}")
    return "\n".join(lines) + "\n"


def _repeat(rule: str, lo: int, hi: int | None) -> str:
    if hi is None:
        return f"{rule}{{{lo},}}" if lo else f"{rule}*"
    return f"{rule}{{{lo},{hi}}}"


def json_schema(schema: dict) -> str:
    """JSON valid against ``schema`` (the subset :data:`KNOWN`), compact, keys in order."""
    rules: dict[str, str] = {}
    used = {"char": False, "number": False, "integer": False}

    def name_for(path: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", path).strip("-") or "v"
        name, k = base, 1
        while name in rules:
            k += 1
            name = f"{base}-{k}"
        rules[name] = ""
        return name

    def value(s: Any, path: str) -> str:
        if not isinstance(s, dict):
            raise GrammarError(f"{path or 'schema'}: a schema is a mapping, got {type(s).__name__}")
        bad = sorted(set(s) - KNOWN)
        if bad:
            raise GrammarError(f"{path or 'schema'}: '{bad[0]}' cannot be enforced while decoding "
                               f"(supported: type, properties, required, items, minItems, maxItems, "
                               f"minLength, maxLength, enum, const, anyOf)")
        name = name_for(path or "root-value")
        if "const" in s:
            rules[name] = literal(json.dumps(s["const"], ensure_ascii=False))
        elif "enum" in s:
            if not s["enum"]:
                raise GrammarError(f"{path or 'schema'}: an empty enum allows nothing")
            rules[name] = " | ".join(literal(json.dumps(e, ensure_ascii=False)) for e in s["enum"])
        elif "anyOf" in s:
            rest = {k: v for k, v in s.items() if k != "anyOf"}
            rules[name] = " | ".join(value({**rest, **alt}, f"{path}-any{i}")
                                     for i, alt in enumerate(s["anyOf"]))
        elif isinstance(s.get("type"), list):
            rules[name] = " | ".join(value({**s, "type": t}, f"{path}-{t}") for t in s["type"])
        else:
            rules[name] = typed(s, path)
        return name

    def typed(s: dict, path: str) -> str:
        t = s.get("type")
        if t == "string":
            used["char"] = True
            lo, hi = s.get("minLength", 0), s.get("maxLength")
            if hi is not None and hi > MAX_REPEAT:
                raise GrammarError(f"{path}: maxLength {hi} is over {MAX_REPEAT}")
            return f'"\\"" {_repeat("char", lo, hi)} "\\""'
        if t == "integer":
            used["integer"] = True
            return "integer"
        if t == "number":
            used["integer"] = used["number"] = True
            return "number"
        if t == "boolean":
            return '"true" | "false"'
        if t == "null":
            return '"null"'
        if t == "array":
            if "items" not in s:
                raise GrammarError(f"{path or 'schema'}: an array needs `items` (its elements' schema)")
            item = value(s["items"], f"{path}-item")
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if hi == 0:
                return '"[" "]"'
            more = _repeat(f'(", " {item})', max(lo - 1, 0), None if hi is None else hi - 1)
            return f'"[" {item} {more} "]"' if lo >= 1 else f'"[" ({item} {more})? "]"'
        if t == "object":
            props = s.get("properties", {})
            required = set(s.get("required", []))
            missing = sorted(required - set(props))
            if missing:
                raise GrammarError(f"{path or 'schema'}: required key {missing[0]!r} has no schema "
                                   "under properties")
            return obj(props, required, path)
        raise GrammarError(f"{path or 'schema'}: give a type (string, number, integer, boolean, "
                           f"null, array, object), an enum or a const; got type {t!r}")

    def obj(props: dict, required: set, path: str) -> str:
        """Keys in order, each required one present: ``first-i`` = the members start at key i,
        ``rest-i`` = what may follow a member, from key i on."""
        keys = list(props)
        if not keys:
            return '"{" "}"'
        kv = [f'{literal(json.dumps(k, ensure_ascii=False) + ": ")} {value(props[k], f"{path}-{k}")}'
              for k in keys]
        n = len(keys)
        first = [name_for(f"{path}-first-{i}") for i in range(n)]
        rest = [name_for(f"{path}-rest-{i}") for i in range(n)]
        for i in range(n):
            tail = f" {rest[i + 1]}" if i + 1 < n else ""
            need = keys[i] in required
            rules[rest[i]] = f'", " {kv[i]}{tail}' if need else f'(", " {kv[i]})?{tail}'
            rules[first[i]] = f"{kv[i]}{tail}" + (f" | {first[i + 1]}" if not need and i + 1 < n else "")
        return f'"{{" {first[0]} "}}"' if required else f'"{{" ({first[0]})? "}}"'

    top = value(schema, "")
    lines = [f"root ::= {LEAD} {top}"] + [f"{k} ::= {v}" for k, v in rules.items()]
    lines += [r for r, on in ((CHAR, used["char"]), (INTEGER, used["integer"]), (NUMBER, used["number"])) if on]
    return "\n".join(lines) + "\n"
