"""The four structured-output libraries behind one small interface (compile, matcher, fill a
bitmask row, apply, accept, check a text), as the grammar benchmarks drive them."""
from __future__ import annotations

import json
import os

import torch

from grammar_cases import special_ids

MODEL_DIR = os.environ.get("SHOPTUNE_SMOLLM2_DIR", "/work/main/.cache/shoptune/models/smollm2-135m")


def load_tokenizer():
    from transformers import AutoConfig, AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_DIR), AutoConfig.from_pretrained(MODEL_DIR).vocab_size


def plain_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Bitmask (int32, bit j of word i = token 32*i+j) -> -inf for disallowed tokens, in torch."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    logits.masked_fill_(bits.view(bitmask.shape[0], -1)[:, :logits.shape[1]] == 0, float("-inf"))


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

    def closing_suffix(self, m, limit: int = 400) -> str | None:
        """As :meth:`XGrammar.closing_suffix`, with llguidance's primitives (a deep copy, the
        forced bytes, tokens validated before they are consumed)."""
        f, out = m.deep_copy(), ""
        while not f.is_accepting():
            if len(out) > limit or f.is_error():
                return None
            forced = f.compute_ff_bytes()
            if forced:
                if not f.consume_tokens(self.lt.tokenize_bytes(forced)):
                    return None
                out += forced.decode("utf-8", "replace")
                continue
            for c in CLOSERS:
                ids = self.lt.tokenize_str(c)
                if f.validate_tokens(ids) == len(ids):
                    f.consume_tokens(ids)
                    out += c
                    break
            else:
                return None
        return out

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
