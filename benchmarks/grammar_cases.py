"""The constraints the grammar benchmarks measure (``grammar_libs.py``, ``grammar_engines.py``):
shoptune's four kinds -- one of N labels, a subset of labels, a JSON Schema inferred from data,
number lists -- with a valid answer each, the JSON Schema keyword checks, and the GBNF writers
that express a constraint once for every engine."""
from __future__ import annotations

import itertools
import json

# ----------------------------------------------------------------------------- constraints

LABELS6 = ["Home & Kitchen", "Home Improvement", "Electronics", "Toys & Games", "Grocery", "Beauty"]
_DEPTS = ["Home & Kitchen", "Home Improvement", "Electronics", "Toys & Games", "Grocery & Gourmet Food",
          "Beauty & Personal Care", "Health & Household", "Sports & Outdoors", "Clothing, Shoes & Jewelry",
          "Office Products", "Pet Supplies", "Automotive", "Baby", "Garden & Outdoor", "Tools & Home Improvement",
          "Arts, Crafts & Sewing", "Books", "Cell Phones & Accessories", "Industrial & Scientific", "Musical Instruments"]
_SUBS = ["Accessories", "Storage & Organization", "Parts", "Gift Sets", "Kits", "Cleaning Supplies",
         "Lighting", "Furniture", "Replacement Parts", "Home Decor"]
LABELS200 = [f"{d} > {s}" for d in _DEPTS for s in _SUBS]

SCHEMA_C = {  # what `tasks new --json COL` would infer from a column of attribute objects
    "type": "object",
    "properties": {
        "brand": {"type": "string", "maxLength": 40},
        "price": {"type": "number"},
        "color": {"enum": ["black", "white", "red", "blue", "green", "silver", "brown", "pink"]},
        "materials": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
        "features": {"type": "array", "items": {"type": "string", "maxLength": 40},
                     "minItems": 1, "maxItems": 5},
    },
    "required": ["brand", "price", "color", "materials", "features"],
    "additionalProperties": False,
}


def unbounded(schema):
    """The schema without maxItems/maxLength (what a naive inference would write)."""
    if isinstance(schema, dict):
        return {k: unbounded(v) for k, v in schema.items() if k not in ("maxItems", "maxLength")}
    return schema


def rx_escape(s: str) -> str:
    """Escape regex metacharacters only (Rust's regex crate refuses needless escapes like ``\\ ``)."""
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}" else c for c in s)


def rx_alt(items) -> str:
    return "(" + "|".join(rx_escape(str(x)) for x in items) + ")"


RETRIEVAL_VALUES = list(range(1, 21))

# One GBNF for a bounded schema of the kind `tasks new` infers (an object of string / number /
# enum / array-of-string fields): compact separators ", " and ": ", keys in schema order, JSON
# escapes allowed and raw control characters not, numbers of at most 16+16+3 digits. llama.cpp,
# xgrammar (built-in engine, vLLM's default backend) and llguidance all parse this dialect (no
# empty alternatives, no lookahead), so every engine allows exactly these strings.
GBNF_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
GBNF_NUMBER = ('number ::= "-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?')


def schema_gbnf(schema: dict) -> str:
    rules: dict[str, str] = {}

    def value(name: str, s: dict) -> str:
        if "enum" in s:
            rules[name] = " | ".join(json.dumps(json.dumps(e)) for e in s["enum"])
        elif s.get("type") == "string":
            n = s.get("maxLength")
            rules[name] = f'"\\"" char{{{s.get("minLength", 0)},{n}}} "\\""' if n is not None else '"\\"" char* "\\""'
        elif s.get("type") in ("number", "integer"):
            return "number"
        elif s.get("type") == "array":
            item = value(name + "-item", s["items"])
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            more = f'(", " {item}){{{max(lo - 1, 0)},{"" if hi is None else hi - 1}}}'
            body = f"{item} {more}"
            rules[name] = f'"[" {body} "]"' if lo >= 1 else f'"[" ({body})? "]"'
        else:
            raise ValueError(f"{name}: a {s.get('type')!r} field has no GBNF here")
        return name

    parts = []
    for i, (key, s) in enumerate(schema["properties"].items()):
        lead = ("{" if i == 0 else ", ") + json.dumps(key) + ": "
        parts.append(f"{json.dumps(lead)} {value('v-' + key.replace('_', '-'), s)}")
    if set(schema.get("required", [])) != set(schema["properties"]):
        raise ValueError("optional keys: not in this sketch")
    lines = ["root ::= " + " ".join(parts) + ' "}"'] + [f"{k} ::= {v}" for k, v in rules.items()]
    return "\n".join(lines + [GBNF_CHAR, GBNF_NUMBER]) + "\n"


def ordered_subset_gbnf(labels, k: int) -> str:
    """GBNF for a JSON list of 1..k labels, each at most once, in the order of ``labels`` (unique
    items without enumerating subsets: rule ``p-j-i`` = the list's j-th item is label i or a later
    one; O(N*k) rules). The order is no loss where the metric compares sets."""
    n, lines = len(labels), ['root ::= "[" p-0-0 "]"']
    for j in range(k):
        for i in range(j, n):
            more = f' (", " p-{j + 1}-{i + 1})?' if j + 1 < k and i + 1 < n else ""
            skip = f" | p-{j}-{i + 1}" if i + 1 < n else ""
            lines.append(f"p-{j}-{i} ::= {json.dumps(json.dumps(labels[i]))}{more}{skip}")
    return "\n".join(lines) + "\n"


def constraints() -> dict[str, dict]:
    """name -> {"regex" or "schema", "answer": a valid output, "what"}."""
    labels_json = {"type": "array", "items": {"enum": LABELS6}, "minItems": 1, "maxItems": 3}
    labels200_json = {"type": "array", "items": {"enum": LABELS200}, "minItems": 1, "maxItems": 3}
    return {
        "a_label6": {"what": "(a) one of 6 labels", "regex": rx_alt(LABELS6), "answer": "Home Improvement"},
        "a_label200": {"what": "(a) one of 200 labels", "regex": rx_alt(LABELS200),
                       "answer": "Tools & Home Improvement > Replacement Parts"},
        "b_labels_json": {"what": "(b) 1-3 of 6 labels, JSON list", "schema": labels_json,
                          "answer": '["Home & Kitchen", "Beauty"]'},
        "b_labels200_json": {"what": "(b) 1-3 of 200 labels, JSON list", "schema": labels200_json,
                             "answer": '["Pet Supplies > Kits", "Baby > Lighting", "Books > Parts"]'},
        "b_labels200_unique_gbnf": {"what": "(b) 1-3 of 200 labels, JSON list, unique (in label order; GBNF)",
                                    "gbnf": ordered_subset_gbnf(LABELS200, 3),
                                    "answer": '["Toys & Games > Kits", "Baby > Lighting", "Books > Parts"]'},
        "b_labels_csv": {"what": "(b) 1-3 of 6 labels, comma-separated",
                         "regex": f"{rx_alt(LABELS6)}(, {rx_alt(LABELS6)}){{0,2}}",
                         "answer": "Toys & Games, Grocery"},
        "c_json": {"what": "(c) inferred JSON schema (bounded)", "schema": SCHEMA_C,
                   "answer": json.dumps({"brand": "Hydro Flask", "price": 34.95, "color": "blue",
                                         "materials": ["stainless steel", "silicone"],
                                         "features": ["vacuum insulated", "leak proof lid",
                                                      "keeps drinks cold 24 hours"]})},
        "c_json_gbnf": {"what": "(c) the same schema as one GBNF for all engines", "gbnf": schema_gbnf(SCHEMA_C),
                        "answer": json.dumps({"brand": "Hydro Flask", "price": 34.95, "color": "blue",
                                              "materials": ["stainless steel", "silicone"],
                                              "features": ["vacuum insulated", "leak proof lid",
                                                           "keeps drinks cold 24 hours"]})},
        "d_rank": {"what": "(d) ranking: a permutation of 1..5",
                   "regex": rx_alt(", ".join(p) for p in itertools.permutations("12345")),
                   "answer": "3, 1, 5, 2, 4"},
        "d_retrieval": {"what": "(d) 3 unique of 20 numbers (6,840 lists spelled out)",
                        "regex": rx_alt(", ".join(map(str, p)) for p in itertools.permutations(RETRIEVAL_VALUES, 3)),
                        "answer": "12, 3, 17"},
        "d_retrieval_free": {"what": "(d) 3 of 20 numbers, repeats allowed (today's gateway regex)",
                             "regex": f"{rx_alt(RETRIEVAL_VALUES)}(, {rx_alt(RETRIEVAL_VALUES)}){{2}}",
                             "answer": "12, 3, 17"},
    }


# Keyword checks: (name, schema, [(text, must_be_complete, expected_accepted)]). A prefix
# (complete=False) is accepted when some continuation of it is valid.
SUPPORT = [
    ("maxItems", {"type": "array", "items": {"type": "string"}, "maxItems": 2},
     [('["a", "b"]', True, True), ('["a", "b", ', False, False)]),
    ("minItems", {"type": "array", "items": {"type": "string"}, "minItems": 2},
     [('["a", "b"]', True, True), ('["a"]', True, False)]),
    ("maxLength", {"type": "string", "maxLength": 3}, [('"abc"', True, True), ('"abcd', False, False)]),
    ("minLength", {"type": "string", "minLength": 2}, [('"ab"', True, True), ('"a"', True, False)]),
    ("enum", {"enum": ["red", "blue"]}, [('"red"', True, True), ('"gr', False, False)]),
    ("anyOf", {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer"}]},
     [('"ab"', True, True), ("12", True, True), ("true", True, False)]),
    ("uniqueItems", {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True},
     [('["a", "b"]', True, True), ('["a", "a"', False, False)]),
    ("required", {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                  "additionalProperties": False}, [('{"x": 1}', True, True), ("{}", True, False)]),
    ("additionalProperties:false", {"type": "object", "properties": {"x": {"type": "integer"}},
                                    "additionalProperties": False},
     [('{"x": 1}', True, True), ('{"y', False, False)]),
    ("integer minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 20},
     [("20", True, True), ("25", True, False), ("123", False, False)]),
    ("number digits bounded", {"type": "number"}, [("1.5", True, True), ("1" * 80, False, False)]),
    ("pattern", {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
     [('"AB123"', True, True), ('"A1', False, False)]),
    ("no raw control character in a string", {"type": "string"}, [('"ab"', True, True), ('"a\tb"', True, False)]),
    ("... in a maxLength string", {"type": "string", "maxLength": 5},
     [('"ab"', True, True), ('"a\tb"', True, False)]),
]
# The same for regexes: a language where an answer may end or go on.
REGEX_SUPPORT = [
    ("regex: may end or go on", "(a|b)(, (a|b))?", [("a", True, True), ("a, b", True, True)]),
    ("regex: an alternative that is a prefix of another", "(1|12)", [("1", True, True), ("12", True, True)]),
]


TITLES = ["Hydro Flask 32 oz Wide Mouth Water Bottle, Stainless Steel, Pacific Blue",
          "Lodge 10.25 Inch Cast Iron Skillet, Pre-Seasoned, Black",
          "Anker PowerCore 10000 Portable Charger, Black, USB-C",
          "LEGO Classic Medium Creative Brick Box 10696, 484 Pieces",
          "Burt's Bees Beeswax Lip Balm, 4 Pack, Natural Moisturizer",
          "DEWALT 20V MAX Cordless Drill Kit, Yellow, with Battery and Charger",
          "Nike Women's Revolution 6 Running Shoe, White/Pink",
          "Yankee Candle Large Jar Candle, Clean Cotton, 22 oz, White"]


def _valid_c(v, schema) -> int:
    """1 when ``v`` has exactly the schema's keys with the right types and the bounds it sets."""
    props = schema["properties"]
    if not isinstance(v, dict) or set(v) != set(props):
        return 0
    for k, p in props.items():
        x = v[k]
        if "enum" in p and x not in p["enum"]:
            return 0
        if p.get("type") == "string" and not (isinstance(x, str) and len(x) <= p.get("maxLength", 10**9)):
            return 0
        if p.get("type") == "number" and not isinstance(x, (int, float)):
            return 0
        if p.get("type") == "array":
            if not (isinstance(x, list) and p.get("minItems", 0) <= len(x) <= p.get("maxItems", 10**9)):
                return 0
            if not all(isinstance(i, str) and len(i) <= p["items"].get("maxLength", 10**9) for i in x):
                return 0
    return 1


def max_tokens_bound(schema) -> dict:
    """The longest output a bounded schema allows, in bytes (= tokens at worst: a byte-level BPE
    can spell any text one byte per token), for ASCII text and for text with JSON escapes (a
    ``\\uXXXX`` escape is one character of maxLength but 6 bytes). Only keys this page uses."""
    def walk(s, esc):
        if "enum" in s:
            return max(len(json.dumps(e)) for e in s["enum"])
        t = s.get("type")
        if t == "string":
            return 2 + s["maxLength"] * (6 if esc else 1) if "maxLength" in s else None
        if t == "array":
            n, item = s.get("maxItems"), walk(s["items"], esc)
            return None if n is None or item is None else 2 + n * item + 2 * max(n - 1, 0)
        if t == "object":
            parts = [walk(p, esc) for p in s["properties"].values()]
            if None in parts:
                return None
            keys = sum(len(json.dumps(k)) + 2 for k in s["properties"])
            return 2 + keys + sum(parts) + 2 * (len(parts) - 1)
        return None  # numbers: digits are not bounded by the schema
    return {"ascii_bytes_without_number": walk({**schema, "properties": {k: v for k, v in schema["properties"].items()
                                                                         if v.get("type") != "number"}}, False),
            "escaped_bytes_without_number": walk({**schema, "properties": {k: v for k, v in schema["properties"].items()
                                                                           if v.get("type") != "number"}}, True)}


def special_ids(tok) -> set[int]:
    return set(tok.all_special_ids) | {i for i, a in tok.added_tokens_decoder.items() if a.special}
