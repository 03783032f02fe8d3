"""Which structured-output library constrains shoptune's decoding: xgrammar, llguidance,
outlines-core or lm-format-enforcer, measured on this machine with the embedded model's tokenizer
(SmolLM2-135M, vocab 49,152). Input to issue #32 item 3.

Runs in a venv of its own (the candidates are not project dependencies):

    python3 -m venv /work/gramvenv && /work/gramvenv/bin/pip install torch==2.13.0
    /work/gramvenv/bin/pip install transformers==5.23.0 apache-tvm-ffi==0.1.15.post2 pydantic \
        numpy psutil llguidance==1.9.1 outlines-core==0.2.14 outlines==1.3.3 \
        lm-format-enforcer==0.11.3
    /work/gramvenv/bin/pip install --no-deps xgrammar==0.2.8    # (its triton pin is GPU-only)
    flock /tmp/shoptune-heavy.lock /work/gramvenv/bin/python benchmarks/grammar_libs.py \
        --out docs/results/grammar_libs.json

Each library runs in a fresh subprocess (cold compiles, its own memory). For each constraint
shoptune needs -- (a) one of N labels, (b) a subset of labels as a JSON list or comma-separated,
(c) a JSON Schema inferred from data (strings, number, enum, string arrays, maxItems/maxLength,
required, additionalProperties false), (d) today's number lists (a ranking permutation; 3 unique
retrieval numbers out of 20) -- it measures the compile time, the first mask (time to first
token's constraint), and the per-token cost of filling the bitmask and applying it to a
49,152-float logits row while a valid answer is force-fed token by token (every token must be
allowed, and EOS at the end); then a batch of 8 rows with 8 different grammars per step; then
which JSON Schema keywords each library honours (checked on strings, not read from docs). The
baseline is the model's own decode step (HF ``generate``, bf16, batch 1 and 8), measured in the
same run, and ``generate`` with a per-row grammar processor vs without, which also answers whether
the untuned model under a grammar finishes within its budget.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODEL_DIR = os.environ.get("SHOPTUNE_SMOLLM2_DIR", "/work/main/.cache/shoptune/models/smollm2-135m")
LIBS = ("xgrammar", "llguidance", "outlines-core", "lm-format-enforcer")
REPEATS = 5  # force-feed passes per constraint (fresh matchers; the compile is reused)
LIMIT_S = 120  # a constraint a library has not compiled and fed by then is recorded as a timeout

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


# ----------------------------------------------------------------------------- libraries

def load_tokenizer():
    from transformers import AutoConfig, AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_DIR), AutoConfig.from_pretrained(MODEL_DIR).vocab_size


def plain_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Bitmask (int32, bit j of word i = token 32*i+j) -> -inf for disallowed tokens, in torch."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    logits.masked_fill_(bits.view(bitmask.shape[0], -1)[:, :logits.shape[1]] == 0, float("-inf"))


def special_ids(tok) -> set[int]:
    return set(tok.all_special_ids) | {i for i, a in tok.added_tokens_decoder.items() if a.special}


def xgrammar_tokenizer_info(tok, vocab):
    """SmolLM2's TokenizerInfo with its 17 special tokens blanked: ``from_huggingface`` keeps
    them as text (``<|im_start|>`` is then a valid piece of a JSON string); xgrammar treats an
    empty entry as a special token, never allowed by a grammar. EOS stays the stop token."""
    import xgrammar as xgr
    special = special_ids(tok)
    encoded = [""] * vocab
    for piece, i in tok.get_vocab().items():
        if i < vocab and i not in special:
            encoded[i] = piece
    return xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab,
                             stop_token_ids=[tok.eos_token_id], add_prefix_space=False)


CLOSERS = '"]},0' + "abcdefghijklmnopqrstuvwxyz123456789 :[{-."


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import xgrammar as xgr
        from importlib.metadata import version
        self.xgr, self.version = xgr, version("xgrammar")
        self.info = xgrammar_tokenizer_info(tok, vocab)
        self.info_hf = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)  # (for the check)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)

    def compile(self, c):
        if "regex" in c:
            return self.compiler.compile_regex(c["regex"])
        if "gbnf" in c:
            return self.compiler.compile_grammar(c["gbnf"])
        return self.compiler.compile_json_schema(json.dumps(c["schema"]), any_whitespace=False,
                                                 separators=(", ", ": "))

    def matcher(self, g):
        return self.xgr.GrammarMatcher(g)

    def fill(self, m, bitmask, i):
        m.fill_next_token_bitmask(bitmask, i)

    def apply(self, logits, bitmask):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, m, t):
        return m.accept_token(t)

    def accepts(self, g, text, complete):
        m = self.matcher(g)
        return bool(m.accept_string(text)) and (not complete or m.is_completed())

    def batch_fill(self, matchers, bitmask):
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def rollback(self, m, n):
        m.rollback(n)

    def forced(self, m):
        return m.find_jump_forward_string()

    def size(self, g):
        return g.memory_size_bytes

    def closing_suffix(self, m, limit: int = 400) -> str | None:
        """A short text that completes the grammar from ``m``'s state (``m`` is not changed):
        forced parts by jump-forward, else the first of :data:`CLOSERS` the grammar takes. Not
        always the shortest (xgrammar has no shortest-completion query), always valid."""
        f, out = m.fork(), ""
        while not f.is_completed():
            if len(out) > limit:
                return None
            forced = f.find_jump_forward_string()
            if forced:
                f.accept_string(forced)
                out += forced
                continue
            ch = next((c for c in CLOSERS if f.accept_string(c)), None)
            if ch is None:
                return None
            out += ch
        return out

    api = {"may end": "GrammarMatcher.is_completed() / EOS bit in the mask",
           "forced continuation": "GrammarMatcher.find_jump_forward_string()",
           "rollback": "GrammarMatcher.rollback(n)", "fork": "GrammarMatcher.fork()",
           "batch mask": "BatchGrammarMatcher.batch_fill_next_token_bitmask (C++ threads)",
           "apply": "apply_token_bitmask_inplace (C++ CPU kernel)",
           "compile cache": "GrammarCompiler cache (same schema: cache hit)"}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.llg, self.lt = llguidance, llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.version = llguidance.__version__
        self.executor = llguidance.LLExecutor(num_threads=2)

    def compile(self, c):
        M = self.llg.LLMatcher
        if "regex" in c:
            g = M.grammar_from_regex(c["regex"])
        elif "gbnf" in c:
            g = self.llg.grammar_from("gbnf", c["gbnf"])
        else:
            g = M.grammar_from_json_schema(c["schema"], overrides={
                "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        err = M.validate_grammar(g, self.lt)
        if err:
            raise ValueError(err)
        m = M(self.lt, g)  # the grammar is built here (there is no separate compiled object)
        if m.is_error():
            raise ValueError(m.get_error())
        return g

    def matcher(self, g):
        return self.llg.LLMatcher(self.lt, g)

    def fill(self, m, bitmask, i):
        self.llg.torch.fill_next_token_bitmask(m, bitmask, i)

    def apply(self, logits, bitmask):
        self.llg.torch.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, m, t):
        return m.consume_token(t)

    def accepts(self, g, text, complete):
        m = self.matcher(g)
        ok = m.consume_tokens(self.lt.tokenize_str(text)) and not m.is_error()
        return bool(ok) and (not complete or m.is_accepting())

    def batch_fill(self, matchers, bitmask):
        self.llg.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)],
                                                   bitmask)

    def rollback(self, m, n):
        m.rollback(n)

    def forced(self, m):
        return m.compute_ff_bytes().decode("utf-8", "replace")

    def size(self, g):
        return None

    api = {"may end": "LLMatcher.is_accepting() / EOS bit in the mask",
           "forced continuation": "LLMatcher.compute_ff_tokens() / compute_ff_bytes()",
           "rollback": "LLMatcher.rollback(n)", "fork": "LLMatcher.deep_copy()",
           "batch mask": "LLExecutor + fill_next_token_bitmask_par (Rust threads)",
           "apply": "apply_token_bitmask_inplace (torch.compile kernel)",
           "compile cache": "none (each LLMatcher builds its grammar; lexer built lazily)"}


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab):
        import outlines_core
        import outlines_core.kernels.torch as kern
        from importlib.metadata import version
        from outlines.backends.outlines_core import OutlinesCoreBackend
        self.oc, self.kern, self.tok = outlines_core, kern, tok
        self.version = version("outlines-core")
        self.vocab = OutlinesCoreBackend.create_outlines_core_vocabulary(
            tok.get_vocab(), tok.eos_token_id, tok.eos_token, lambda t: tok.convert_tokens_to_string([t]))

    def compile(self, c):
        if "gbnf" in c:
            raise ValueError("no context-free grammars (regular languages only)")
        regex = c["regex"] if "regex" in c else \
            self.oc.json_schema.build_regex_from_schema(json.dumps(c["schema"]), None)
        return self.oc.Index(regex, self.vocab)

    def matcher(self, g):
        return self.oc.Guide(g)

    def fill(self, m, bitmask, i):
        self.kern.fill_next_token_bitmask(m, bitmask[i:i + 1])

    def apply(self, logits, bitmask):
        self.kern.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, m, t):
        if not m.accepts_tokens([t]):
            return False
        m.advance(token_id=t, return_tokens=False)
        return True

    def accepts(self, g, text, complete):
        m = self.matcher(g)
        ids = self.tok.encode(text, add_special_tokens=False)
        if not m.accepts_tokens(ids):
            return False
        for t in ids:
            m.advance(token_id=t, return_tokens=False)
        return not complete or m.is_finished()

    def batch_fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            self.fill(m, bitmask, i)

    def rollback(self, m, n):
        m.rollback_state(n)

    def forced(self, m):
        return None

    def size(self, g):
        return None

    api = {"may end": "Guide.is_finished() / EOS bit in the mask", "forced continuation": "none",
           "rollback": "Guide.rollback_state(n) (bounded history)", "fork": "none",
           "batch mask": "none (one Guide at a time)",
           "apply": "apply_token_bitmask_inplace (torch.compile kernel)",
           "compile cache": "none (an Index per regex; JSON -> one regex)"}


class LMFormatEnforcer:
    name = "lm-format-enforcer"

    def __init__(self, tok, vocab):
        import lmformatenforcer as lmfe
        from importlib.metadata import version
        self.lmfe, self.version, self.eos = lmfe, version("lm-format-enforcer"), tok.eos_token_id
        # lmformatenforcer.integrations.transformers (0.11.3) imports
        # transformers.tokenization_utils.PreTrainedTokenizerBase, gone in transformers 5: its
        # build_token_enforcer_tokenizer_data, restated here with the same rules
        zero, special, regular = tok.encode("0", add_special_tokens=False)[-1], special_ids(tok), []
        for i in range(vocab):
            if i not in special:
                after0, alone = tok.decode([zero, i])[1:], tok.decode([i])
                regular.append((i, after0, len(after0) > len(alone)))
        self.data = lmfe.TokenEnforcerTokenizerData(regular, lambda ids: tok.decode(ids).rstrip("\ufffd"),
                                                     tok.eos_token_id, True, vocab)

    def _parser(self, c):
        return self.lmfe.RegexParser(c["regex"]) if "regex" in c else self.lmfe.JsonSchemaParser(c["schema"])

    def compile(self, c):
        if "gbnf" in c:
            raise ValueError("no GBNF/CFG input (its own CharacterLevelParser classes instead)")
        return c

    def matcher(self, c):
        return [self.lmfe.TokenEnforcer(self.data, self._parser(c)), [0]]  # (its state: the token list)

    def fill(self, m, bitmask, i):
        bitmask[i] = m[0].get_allowed_tokens(m[1]).allowed_tokens

    def apply(self, logits, bitmask):
        plain_apply(logits, bitmask)

    def accept(self, m, t):
        m[1].append(t)
        return True

    def accepts(self, c, text, complete):
        p = self._parser(c)
        for ch in text:
            if ch not in p.get_allowed_characters():
                return False
            p = p.add_character(ch)
        return not complete or p.can_end()

    def batch_fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            self.fill(m, bitmask, i)

    def rollback(self, m, n):
        del m[1][-n:]

    def forced(self, m):
        return None

    def size(self, g):
        return None

    api = {"may end": "parser.can_end() / EOS in the allowed list", "forced continuation": "none",
           "rollback": "implicit (state is the token sequence; prefix states cached)", "fork": "implicit",
           "batch mask": "none (Python, one row at a time)", "apply": "none (a token list or bitmask)",
           "compile cache": "per-enforcer prefix cache"}


LIB_CLASSES = {c.name: c for c in (XGrammar, LLGuidance, OutlinesCore, LMFormatEnforcer)}


# ----------------------------------------------------------------------------- measuring one library

def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def bit(bitmask: torch.Tensor, row: int, t: int) -> bool:
    return bool((int(bitmask[row, t // 32]) >> (t % 32)) & 1)


def feed(lib, g, ids, eos, bitmask, logits, base) -> dict:
    """Force-feed ``ids`` then EOS through a fresh matcher; time fill and apply per step."""
    m = lib.matcher(g)
    fills, applies, ok, note = [], [], True, ""
    for step, t in enumerate(ids + [eos]):
        t0 = time.perf_counter()
        lib.fill(m, bitmask, 0)
        t1 = time.perf_counter()
        logits.copy_(base)
        t2 = time.perf_counter()
        plain_apply(logits, bitmask)
        t3 = time.perf_counter()
        fills.append(t1 - t0)
        applies.append(t3 - t2)
        if not bit(bitmask, 0, t) or not torch.isfinite(logits[0, t]):
            ok, note = False, f"token {step} ({t}) not allowed"
            break
        if t != eos and not lib.accept(m, t):
            ok, note = False, f"token {step} ({t}) refused by accept"
            break
    return {"fills": fills, "applies": applies, "ok": ok, "note": note}


def us(xs) -> float:
    return round(1e6 * statistics.fmean(xs), 1) if xs else None


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout(f"not done in {LIMIT_S} s")


def run_lib(name: str) -> dict:
    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(2)
    tok, vocab = load_tokenizer()
    eos = tok.eos_token_id
    r0 = rss_mb()
    t = time.perf_counter()
    lib = LIB_CLASSES[name](tok, vocab)
    out = {"library": name, "version": lib.version, "tokenizer_setup_s": round(time.perf_counter() - t, 3),
           "api": lib.api, "constraints": {}}
    r1 = rss_mb()
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    base = torch.randn(1, vocab)
    logits = base.clone()
    t = time.perf_counter()
    lib.apply(logits, bitmask)  # first apply: torch.compile kernels compile here
    out["first_apply_s"] = round(time.perf_counter() - t, 3)
    compiled = {}
    for cname, c in constraints().items():
        row = {"what": c["what"]}
        ids = tok.encode(c["answer"], add_special_tokens=False)
        row["answer_tokens"] = len(ids)
        signal.alarm(LIMIT_S)
        try:
            t = time.perf_counter()
            g = lib.compile(c)
            row["compile_ms"] = round(1e3 * (time.perf_counter() - t), 2)
            t = time.perf_counter()
            lib.compile(c)
            row["recompile_ms"] = round(1e3 * (time.perf_counter() - t), 2)
            t = time.perf_counter()
            m = lib.matcher(g)
            lib.fill(m, bitmask, 0)
            row["first_mask_ms"] = round(1e3 * (time.perf_counter() - t), 2)
            size = lib.size(g)
            if size is not None:
                row["compiled_bytes"] = size
            runs = [feed(lib, g, ids, eos, bitmask, logits, base) for _ in range(REPEATS)]
            row["ok"] = all(r["ok"] for r in runs)
            if not row["ok"]:
                row["note"] = next(r["note"] for r in runs if r["note"])
            fills = [f for r in runs[1:] for f in r["fills"]]  # (the first pass warms caches)
            applies = [a for r in runs[1:] for a in r["applies"]]
            row.update(fill_us=us(fills), apply_us=us(applies), fill_max_us=round(1e6 * max(fills), 1),
                       first_pass_fill_us=us(runs[0]["fills"]))
            compiled[cname] = g
        except Exception as e:  # noqa: BLE001 - a library that cannot express it: recorded, not fatal
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            signal.alarm(0)
        out["constraints"][cname] = row
        print(f"{name:20s} {cname:18s} {json.dumps(row)[:220]}", file=sys.stderr, flush=True)
    out["apply_us"] = apply_kernels(lib, vocab)
    out["rss_mb"] = {"after_tokenizer_setup": round(r1 - r0, 1), "after_compiles": round(rss_mb() - r0, 1)}
    out["batch8"] = batch8(lib, tok, vocab, compiled)
    out["support"] = support(lib, tok, vocab)
    return out


def apply_kernels(lib, vocab) -> dict:
    """The library's own apply kernel vs :func:`plain_apply`, batch 1 and 8, a mask allowing
    about 1 token in 500 (JSON string content allows far more; the cost does not depend on it)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        bm = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int32, generator=g)
        bm &= torch.randint(-2**31, 2**31 - 1, bm.shape, dtype=torch.int32, generator=g)
        base, logits = torch.randn(batch, vocab, generator=g), torch.empty(batch, vocab)
        for name, f in (("own", lib.apply), ("plain_torch", plain_apply)):
            ts, ref = [], base.clone()
            plain_apply(ref, bm)
            for _ in range(30):
                logits.copy_(base)
                t = time.perf_counter()
                f(logits, bm)
                ts.append(time.perf_counter() - t)
            assert torch.equal(logits, ref), name
            out[f"{name}_batch{batch}"] = round(1e6 * statistics.median(ts), 1)
    return out


def batch8(lib, tok, vocab, compiled) -> dict:
    """8 rows, 8 different grammars, stepped together: fill every open row's mask, apply the
    (8, vocab) mask to the batch's logits, accept each row's next answer token."""
    names = [n for n in ("a_label6", "a_label200", "b_labels_json", "b_labels200_json", "b_labels_csv",
                         "c_json", "d_rank", "d_retrieval", "d_retrieval_free", "b_labels200_unique_gbnf")
             if n in compiled][:8]  # (a library that cannot compile one: the next in this list)
    if len(names) < 8:
        return {"error": f"only {len(names)} grammars compiled"}
    cs = constraints()
    eos = tok.eos_token_id
    seqs = [tok.encode(cs[n]["answer"], add_special_tokens=False) + [eos] for n in names]
    bitmask = torch.full((8, (vocab + 31) // 32), -1, dtype=torch.int32)
    base = torch.randn(8, vocab)
    logits = base.clone()
    out = {}
    for mode in ("loop", "batch_api"):
        steps, ok = [], True
        for _ in range(REPEATS):
            ms = [lib.matcher(compiled[n]) for n in names]
            for step in range(max(map(len, seqs))):
                bitmask.fill_(-1)
                t0 = time.perf_counter()
                open_ = [i for i, s in enumerate(seqs) if step < len(s)]
                if mode == "loop":
                    for i in open_:
                        lib.fill(ms[i], bitmask, i)
                else:
                    lib.batch_fill(ms, bitmask)  # (all rows; a finished row's mask is ignored)
                logits.copy_(base)
                plain_apply(logits, bitmask)
                steps.append(time.perf_counter() - t0)
                for i in open_:
                    t = seqs[i][step]
                    ok &= bit(bitmask, i, t)
                    if t != eos:
                        ok &= bool(lib.accept(ms[i], t))
        out[mode] = {"step_us": us(steps), "ok": bool(ok)}
    out["grammars"] = names
    return out


def _leak(tok, bm, special) -> str:
    allowed = [i for i in special if bit(bm, 0, i)]
    return "none allowed" if not allowed else \
        f"{len(allowed)} of {len(special)} allowed: {tok.convert_ids_to_tokens(allowed[:3])}..."


def support(lib, tok, vocab) -> dict:
    res = {}
    for name, spec, cases in [(n, {"schema": x}, c) for n, x, c in SUPPORT] + \
            [(n, {"regex": x}, c) for n, x, c in REGEX_SUPPORT]:
        try:
            g = lib.compile(spec)
            got = [lib.accepts(g, text, complete) for text, complete, _ in cases]
            res[name] = "yes" if all(g_ == want for g_, (_, _, want) in zip(got, cases)) else \
                "no: " + "; ".join(f"{text!r} {'accepted' if g_ else 'refused'}"
                                   for g_, (text, _, want) in zip(got, cases) if g_ != want)
        except Exception as e:  # noqa: BLE001
            res[name] = f"refused: {type(e).__name__}: {str(e)[:160]}"
    # special tokens inside a JSON string: <|im_start|> etc. must never be allowed there
    try:
        g = lib.compile({"schema": {"type": "string"}})
        m = lib.matcher(g)
        quote = tok.encode('"', add_special_tokens=False)
        for t in quote:
            lib.accept(m, t)
        bm = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
        lib.fill(m, bm, 0)
        special = sorted(special_ids(tok))
        res["special tokens inside a string"] = _leak(tok, bm, special)
        if isinstance(lib, XGrammar):  # the same with TokenizerInfo.from_huggingface
            comp = lib.xgr.GrammarCompiler(lib.info_hf)
            m = lib.xgr.GrammarMatcher(comp.compile_json_schema('{"type": "string"}', any_whitespace=False))
            m.accept_string('"')
            m.fill_next_token_bitmask(bm, 0)
            res["special tokens inside a string (TokenizerInfo.from_huggingface)"] = _leak(tok, bm, special)
    except Exception as e:  # noqa: BLE001
        res["special tokens inside a string"] = f"error: {type(e).__name__}: {e}"
    # rollback: feed 6 tokens of (c), roll back 4, feed them again
    try:
        c = constraints()["c_json"]
        g = lib.compile(c)
        m = lib.matcher(g)
        ids = tok.encode(c["answer"], add_special_tokens=False)[:6]
        assert all(lib.accept(m, t) for t in ids)
        lib.rollback(m, 4)
        res["rollback"] = "yes" if all(lib.accept(m, t) for t in ids[2:]) else "no: refused after rollback"
        res["forced continuation after '{\"brand'"] = repr(lib.forced(lib.matcher(g))) \
            if lib.forced(lib.matcher(g)) is not None else "n/a"
    except Exception as e:  # noqa: BLE001
        res["rollback"] = f"error: {type(e).__name__}: {str(e)[:160]}"
    return res


# ----------------------------------------------------------------------------- the model baseline

def load_model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16).eval()


TITLES = ["Hydro Flask 32 oz Wide Mouth Water Bottle, Stainless Steel, Pacific Blue",
          "Lodge 10.25 Inch Cast Iron Skillet, Pre-Seasoned, Black",
          "Anker PowerCore 10000 Portable Charger, Black, USB-C",
          "LEGO Classic Medium Creative Brick Box 10696, 484 Pieces",
          "Burt's Bees Beeswax Lip Balm, 4 Pack, Natural Moisturizer",
          "DEWALT 20V MAX Cordless Drill Kit, Yellow, with Battery and Charger",
          "Nike Women's Revolution 6 Running Shoe, White/Pink",
          "Yankee Candle Large Jar Candle, Clean Cotton, 22 oz, White"]


def prompts(tok, n):
    msgs = [[{"role": "user", "content": "Extract the product's attributes from its title as JSON with the keys "
                                         "brand, price, color, materials and features.\nTitle: " + t}]
            for t in TITLES[:n]]
    return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]


class GrammarRows:
    """Logits processor: one matcher per row (any library above), as the engine's RowLogits would
    hold it; a row that ended (EOS accepted) is left alone."""

    def __init__(self, lib, grammars, eos, vocab, prompt_len, tok=None, close_budget: int | None = None):
        self.lib, self.eos, self.prompt_len, self.tok = lib, eos, prompt_len, tok
        self.ms = [lib.matcher(g) for g in grammars]
        self.done = [False] * len(grammars)
        self.plans: list[list[int] | None] = [None] * len(grammars)  # forced closing tokens
        self.closed = 0
        self.close_budget = close_budget
        self.bitmask = torch.full((len(grammars), (vocab + 31) // 32), -1, dtype=torch.int32)
        self.time = 0.0

    def _close(self, i: int, left: int) -> None:
        """With ``close_budget``: when the row's remaining tokens just fit a closing text (and
        EOS), force that text from here on."""
        if self.plans[i] is not None or left > 64:
            return
        suffix = self.lib.closing_suffix(self.ms[i])
        if suffix is not None:
            ids = self.tok.encode(suffix, add_special_tokens=False) + [self.eos]
            if len(ids) >= left:
                self.plans[i] = ids
                self.closed += 1

    def __call__(self, input_ids, scores):
        t0 = time.perf_counter()
        self.bitmask.fill_(-1)
        step = input_ids.shape[1] - self.prompt_len
        for i, m in enumerate(self.ms):
            if step > 0 and not self.done[i]:
                t = int(input_ids[i, -1])
                if t == self.eos or not self.lib.accept(m, t):
                    self.done[i] = True
            if self.done[i]:
                continue
            if self.close_budget is not None:
                self._close(i, self.close_budget - step)
            if self.plans[i]:
                self.bitmask[i] = 0
                t = self.plans[i].pop(0)
                self.bitmask[i, t // 32] = (1 << (t % 32)) - (1 << 32 if t % 32 == 31 else 0)
            else:
                self.lib.fill(m, self.bitmask, i)
        s = scores.float()
        self.lib.apply(s, self.bitmask)
        self.time += time.perf_counter() - t0
        return s


def run_model(libs: list[str], budget: int) -> dict:
    from transformers import GenerationConfig, LogitsProcessorList
    torch.set_num_threads(2)
    tok, vocab = load_tokenizer()
    tok.padding_side = "left"
    model = load_model()
    out = {"dtype": "bfloat16", "decode": {}, "grammar_generate": {}}

    def gen(batch, new, processors=None):
        enc = tok(prompts(tok, batch), return_tensors="pt", padding=True, add_special_tokens=False)
        cfg = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
        t = time.perf_counter()
        with torch.inference_mode():
            ids = model.generate(**enc, generation_config=cfg, logits_processor=processors)
        return time.perf_counter() - t, ids[:, enc["input_ids"].shape[1]:], enc["input_ids"].shape[1]

    gen(1, 4)  # warm-up
    for batch in (1, 8):
        t1, _, _ = gen(batch, 1, None)
        cfg_min = 33  # 32 decode steps after the first token; EOS ignored by min_new_tokens below
        enc = tok(prompts(tok, batch), return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, generation_config=GenerationConfig(
                max_new_tokens=cfg_min, min_new_tokens=cfg_min, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
        tn = time.perf_counter() - t
        out["decode"][f"batch{batch}"] = {"ms_per_step": round(1e3 * (tn - t1) / (cfg_min - 1), 2),
                                          "prefill_plus_first_ms": round(1e3 * t1, 1)}
        print("decode", batch, out["decode"][f"batch{batch}"], file=sys.stderr, flush=True)

    import re
    for name in libs:
        lib = LIB_CLASSES[name](tok, vocab)
        res = {}
        runs = [("bounded", {"schema": SCHEMA_C}, budget, False, (1, 8)),
                ("unbounded", {"schema": unbounded(SCHEMA_C)}, budget, False, (1, 8))]
        if hasattr(lib, "closing_suffix"):  # one GBNF, a tight budget, closed when it runs out
            runs.append(("gbnf_close_at_40", {"gbnf": schema_gbnf(SCHEMA_C)}, 40, True, (8,)))
        for label, spec, new_tokens, close, batches in runs:
            g = lib.compile(spec)
            schema = SCHEMA_C if "gbnf" in spec else spec["schema"]
            for batch in batches:
                enc_len = tok(prompts(tok, batch), return_tensors="pt", padding=True,
                              add_special_tokens=False)["input_ids"].shape[1]
                proc = GrammarRows(lib, [g] * batch, tok.eos_token_id, vocab, enc_len, tok,
                                   new_tokens if close else None)
                secs, new, _ = gen(batch, new_tokens, LogitsProcessorList([proc]))
                texts, lens, valid = [], [], 0
                for row in new.tolist():
                    n = next((k for k, t in enumerate(row) if t == tok.eos_token_id), None)
                    lens.append(len(row) if n is None else n + 1)
                    text = tok.decode(row[:n] if n is not None else row, skip_special_tokens=True)
                    texts.append(text)
                    try:
                        v = json.loads(text)
                        valid += _valid_c(v, schema)
                    except ValueError:
                        pass
                steps = new.shape[1]
                res[f"{label}_batch{batch}"] = {
                    "finished_with_eos": sum(1 for row in new.tolist() if tok.eos_token_id in row),
                    "rows": batch, "valid_json_rows": valid, "tokens_per_row": lens, "steps": steps,
                    "ms_per_step": round(1e3 * secs / max(steps, 1), 2),
                    "grammar_ms_per_step": round(1e3 * proc.time / max(steps, 1), 3),
                    "example": texts[0][:400],
                    "max_list_len": max((len(re.findall(r'", "', t)) for t in texts), default=0),
                    "rows_closed_at_budget": proc.closed}
                print(name, label, batch, {k: v for k, v in res[f"{label}_batch{batch}"].items() if k != "example"},
                      file=sys.stderr, flush=True)
        out["grammar_generate"][name] = res
        del lib
        gc.collect()
    return out


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


# ----------------------------------------------------------------------------- main

def machine() -> dict:
    cpu = Path("/proc/cpuinfo").read_text()
    flags = next((ln for ln in cpu.splitlines() if ln.startswith("flags")), "")
    return {"cpu": next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), "?"),
            "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "python": platform.python_version(), "torch": torch.__version__}


def child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    sys.stderr.write(r.stderr[-4000:])
    if r.returncode:
        return {"error": f"exit {r.returncode}: {r.stderr[-600:]}"}
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--generate-libs", default="xgrammar,llguidance")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--only-lib", help=argparse.SUPPRESS)
    ap.add_argument("--only-model", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.only_lib:
        print(json.dumps(run_lib(a.only_lib)))
        return
    if a.only_model:
        print(json.dumps(run_model([x for x in a.generate_libs.split(",") if x], a.budget)))
        return
    from transformers import __version__ as tv
    record = {"machine": machine(), "transformers": tv, "model_dir": MODEL_DIR,
              "command": "python " + " ".join(sys.argv), "libraries": {},
              "max_tokens_bound_c": max_tokens_bound(SCHEMA_C)}
    for name in a.libs.split(","):
        record["libraries"][name] = child(["--only-lib", name])
    record["model"] = child(["--only-model", "--generate-libs", a.generate_libs, "--budget", str(a.budget)])
    print_table(record)
    if a.out:
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(a.out)


def print_table(record) -> None:
    dec = record.get("model", {}).get("decode", {}).get("batch1", {}).get("ms_per_step")
    print(f"decode step (batch 1, bf16): {dec} ms")
    for cname in constraints():
        print(f"\n{cname}")
        for lib, r in record["libraries"].items():
            c = r.get("constraints", {}).get(cname, {})
            tot = (c.get("fill_us") or 0) + (c.get("apply_us") or 0)
            ratio = f"{tot / (1e3 * dec):.2%}" if dec and c.get("fill_us") is not None else "-"
            print(f"  {lib:20s} compile {c.get('compile_ms')} ms, first mask {c.get('first_mask_ms')} ms, "
                  f"fill {c.get('fill_us')} us + apply {c.get('apply_us')} us per token "
                  f"({ratio} of a decode step), ok={c.get('ok')} {c.get('error', c.get('note', ''))[:80]}")


if __name__ == "__main__":
    main()
