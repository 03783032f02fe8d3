"""JSON answers: a schema inferred from gold values, answers written in the schema's key order,
and a truncated answer closed into a valid one.

A grammar keeps every token of a constrained answer inside the schema, but the token budget may
end before the JSON does (an untuned model repeats list items until it runs out). :func:`close`
turns such a prefix into a document valid against the schema: the last complete values are kept,
a cut string is closed, open arrays and objects are closed, required keys that never came are
filled with the schema's smallest value, and arrays or strings over their bounds are cut back.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

# Bounds an inferred schema puts on what the model may write: list items and string lengths are
# capped at this factor over the longest seen in the data (rounded up), so an untuned model that
# repeats items stops, and an answer a little longer than the training data still fits.
SLACK = 2
MAX_STRING = 2000


def _type_of(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def infer_schema(values: list[Any]) -> dict:
    """A JSON Schema that every value of ``values`` is valid against: types and keys seen (a key
    in every object is required; no other keys), array items and string lengths bounded at
    ``SLACK`` times the largest seen. Mixed integer/number is ``number``; other mixes are a
    ``type`` list."""
    types = sorted({_type_of(v) for v in values})
    if set(types) == {"integer", "number"}:
        types = ["number"]
    if len(types) > 1:
        return {"type": types}
    t = types[0] if types else "null"
    out: dict = {"type": t}
    if t == "object":
        keys: dict[str, list] = {}
        for v in values:
            for k, x in v.items():
                keys.setdefault(k, []).append(x)
        out["properties"] = {k: infer_schema(xs) for k, xs in keys.items()}
        out["required"] = [k for k, xs in keys.items() if len(xs) == len(values)]
        out["additionalProperties"] = False
    elif t == "array":
        items = [x for v in values for x in v]
        if items:
            out["items"] = infer_schema(items)
        out["maxItems"] = max(1, SLACK * max(len(v) for v in values))
    elif t == "string":
        out["maxLength"] = min(MAX_STRING, max(1, SLACK * max(len(v) for v in values)))
    return out


def minimal(schema: dict) -> Any:
    """The smallest value valid against ``schema`` (for a required key the answer never wrote)."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return minimal(schema[key][0])
    t = schema.get("type", "object")
    if isinstance(t, list):
        t = "null" if "null" in t else t[0]
    if t == "object":
        props = schema.get("properties", {})
        return {k: minimal(props.get(k, {})) for k in schema.get("required", [])}
    if t == "array":
        return [minimal(schema.get("items", {})) for _ in range(schema.get("minItems", 0))]
    if t == "string":
        return "-" * schema.get("minLength", 0)
    if t in ("number", "integer"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        return max(0, math.ceil(lo)) if t == "integer" else max(0, lo)
    if t == "boolean":
        return False
    return None


def ordered(value: Any, schema: dict) -> Any:
    """``value`` with object keys in the schema's ``properties`` order (others after, as given):
    the order a grammar makes the model write them in, so training targets use it too."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        keys = [k for k in props if k in value] + [k for k in value if k not in props]
        return {k: ordered(value[k], props.get(k, {})) for k in keys}
    if isinstance(value, list):
        items = schema.get("items", {})
        return [ordered(v, items) for v in value]
    return value


def dumps(value: Any, schema: dict | None = None) -> str:
    """An answer as the model is trained to write it (and as the grammar allows): json.dumps'
    default separators, non-ASCII as is, keys in schema order."""
    return json.dumps(ordered(value, schema or {}), ensure_ascii=False)


def _cut_prefix(text: str) -> str:
    """The longest prefix of ``text`` (a JSON prefix) that ends on a complete value, closed: a cut
    string value is closed, a cut key, number or literal is dropped, open containers are closed."""
    stack: list[str] = []  # "{" / "["
    safe, safe_stack = 0, []  # a cut here (plus closers for safe_stack) is valid JSON
    i, n = 0, len(text)
    in_string, is_key = False, False
    expect_key = False
    while i < n:
        c = text[i]
        if in_string:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_string = False
                if not is_key:
                    safe, safe_stack = i + 1, list(stack)
            i += 1
            continue
        if c == '"':
            in_string = True
            is_key = bool(stack) and stack[-1] == "{" and expect_key
            i += 1
            continue
        if c in "{[":
            stack.append(c)
            expect_key = c == "{"
            safe, safe_stack = i + 1, list(stack)
        elif c in "}]":
            if stack:
                stack.pop()
            safe, safe_stack = i + 1, list(stack)
            expect_key = False
        elif c == ",":
            expect_key = bool(stack) and stack[-1] == "{"
        elif c == ":":
            expect_key = False
        elif c in " \t\r\n":
            pass
        else:  # a number or literal: complete when the next char ends it
            j = i
            while j < n and text[j] not in ",}] \t\r\n":
                j += 1
            try:  # (at the very end too: a number the budget cut is still a number)
                json.loads(text[i:j])
                safe, safe_stack = j, list(stack)
            except ValueError:
                pass
            i = j
            continue
        i += 1
    if in_string and not is_key:  # a value cut mid-string: keep what came, close the quote
        body = _drop_cut_escape(text)
        return body + '"' + "".join("}" if s == "{" else "]" for s in reversed(stack))
    head = text[:safe]
    return head + "".join("}" if s == "{" else "]" for s in reversed(safe_stack))


def _drop_cut_escape(body: str) -> str:
    """``body`` (ending inside a string) without an escape the cut left unfinished: a lone
    backslash, or ``\\u`` with fewer than 4 hex digits."""
    m = re.search(r"(\\+)(u[0-9a-fA-F]{0,3})?$", body)
    if m and len(m.group(1)) % 2 == 1:
        return body[:m.start(1) + len(m.group(1)) - 1]
    return body


def _fix(value: Any, schema: dict) -> Any:
    """Missing required keys filled, arrays and strings cut to their maxima, recursively."""
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            value = {k: v for k, v in value.items() if k in props}
        value = {k: _fix(v, props.get(k, {})) for k, v in value.items()}
        for k in schema.get("required", []):
            if k not in value:
                value[k] = minimal(props.get(k, {}))
        return ordered(value, schema)
    if isinstance(value, list):
        value = value[:schema["maxItems"]] if "maxItems" in schema else value
        return [_fix(v, schema.get("items", {})) for v in value]
    if isinstance(value, str) and "maxLength" in schema:
        return value[:schema["maxLength"]]
    return value


def validator(schema: dict):
    from jsonschema import Draft202012Validator
    return Draft202012Validator(schema)


def check_schema(schema: Any) -> str | None:
    """Why ``schema`` is not a usable JSON Schema (None: it is)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    if not isinstance(schema, dict):
        return f"a JSON Schema is a mapping, got {type(schema).__name__}"
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        return f"not a valid JSON Schema: {e.message}"
    return None


def first_error(value: Any, schema: dict) -> str | None:
    """The first way ``value`` breaks ``schema``, as "path: message" (None: valid)."""
    err = next(iter(sorted(validator(schema).iter_errors(value), key=lambda e: list(e.path))), None)
    if err is None:
        return None
    path = "/".join(str(p) for p in err.path)
    return f"{path}: {err.message}" if path else err.message


def parse(text: str, schema: dict, *, close_truncated: bool = True) -> Any:
    """The JSON answer in ``text`` if it is (or, closed where it was cut, becomes) valid against
    ``schema``; None otherwise. Text around the first ``{``/``[`` document is ignored."""
    text = text.strip()
    starts = [k for k in (text.find("{"), text.find("[")) if k >= 0]
    t = schema.get("type")
    if starts and t in ("object", "array"):
        text = text[min(starts):]
    # strict=False: a raw control character inside a string (an unconstrained engine may write
    # one) is read as it is; the answer served is then valid JSON again
    decoder = json.JSONDecoder(strict=False)
    try:
        value, end = decoder.raw_decode(text)
    except (ValueError, RecursionError):
        if not close_truncated:
            return None
        try:
            value = decoder.decode(_cut_prefix(text))
        except (ValueError, RecursionError):
            return None
    value = _fix(value, schema)
    return value if first_error(value, schema) is None else None
