"""One decoding core for training, evaluation and serving: prompts, plans and constraints.

* :func:`build_prompts`: the text a question is sent as, by protocol (starter-kit, chat,
  fewshot), each question rendered through its task card's ``prompt``;
* :class:`Plan` / :func:`plan_for`: how a question is decoded, by task type (and the card's
  ``max_new_tokens``):

  - multiple choice: the answer is the highest-scoring *valid option token* after one forward
    pass (:func:`best_choice`; options found in the prompt, yes/no for EC-Guide's bool metric);
  - retrieval / ranking: only digit/comma/space tokens may be generated
    (:class:`NumberListProcessor`): numbers of the question's list (retrieval) or 1..5 (ranking),
    a limit long enough to write them, stop at "\\n";
  - NER: short limit, stop at "\\n"; generation: the task's own length limit (BLEU/ROUGE-L
    tasks stop at "\\n", since BLEU scores the first line only).

``shoptune eval`` (``eval.backends.LocalBackend``), the serving engine (``serve.engine``), its
task endpoint and the gateway (``serve.upstream``), and training's prompt formatting all take
these from here, so a question is asked and constrained the same way everywhere.
"""
from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence

import torch

from shoptune import tasks
from shoptune.records import Record
from shoptune.tasks import Grammar

STARTER_KIT_PREFIX = ("You are a helpful online shopping assistant. Please answer the following "
                      "question about online shopping and follow the given instructions.\n\n")


class NumberListProcessor:
    """Logits processor for retrieval/ranking answers: only "n, n, n" lists of valid numbers.

    Numbers stay within 1..``max_value`` (the prompt's numbered list), or with ``values`` are
    exactly those numbers (the list's own, however large); ranking answers are a permutation (no
    number twice). After ``count`` numbers the answer may only end. The output is still parsed by
    the unchanged rules; this only keeps the model on the answer format.
    """

    def __init__(self, tok, prompt_len: int, max_value: int, count: int, unique: bool,
                 values: Sequence[int] = ()):
        self.tok, self.prompt_len = tok, prompt_len
        self.max_value, self.count, self.unique = max_value, count, unique
        self.values = {str(v) for v in values if v >= 1}
        self.digit = {str(d): tok.convert_tokens_to_ids(str(d)) for d in range(10)}
        self.comma = tok.encode(",", add_special_tokens=False)[0]
        self.space = tok.encode(" ", add_special_tokens=False)[0]
        self.end = [tok.eos_token_id] + tok.encode("\n", add_special_tokens=False)

    def _allowed_values(self, text: str, nums: list[str]) -> list[int]:
        """``allowed`` for a list of given numbers: digits that keep the number a prefix of one."""
        if text.endswith(","):
            return [self.space]
        part = nums[-1] if text and text[-1].isdigit() else ""
        used = set(nums[:-1] if part else nums) if self.unique else set()
        open_ = [v for v in self.values if v.startswith(part) and v not in used]
        ids = [self.digit[d] for d in sorted({v[len(part)] for v in open_ if len(v) > len(part)})]
        if part and part in open_:  # a whole number: the list goes on or ends
            more = len(nums) < min(self.count, len(self.values))
            ids += [self.comma] if more else self.end
        return ids or self.end

    def allowed(self, text: str) -> list[int]:
        if "\n" in text.lstrip():  # the list has ended: nothing may follow (with or without stop_newline)
            return [self.tok.eos_token_id]
        nums = re.findall(r"\d+", text)
        if self.values:
            return self._allowed_values(text, nums)
        if text and text[-1].isdigit():
            part = nums[-1]
            ids = [t for d, t in self.digit.items() if int(part + d) <= self.max_value
                   and not (self.unique and str(int(part + d)) in nums[:-1])]
            more = len(nums) < min(self.count, self.max_value)
            return ids + ([self.comma] if more else []) + ([] if more else self.end)
        if text.endswith(","):
            return [self.space]
        used = set(nums) if self.unique else set()
        return [t for d, t in self.digit.items() if d != "0" and int(d) <= self.max_value
                and d not in used] or self.end

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, -math.inf)
        for row in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
            mask[row, self.allowed(text)] = 0
        return scores + mask


class Grammars:
    """A tokenizer's compiled grammars (llguidance), one per :class:`~shoptune.tasks.Grammar`
    (a GBNF text, :mod:`shoptune.tasks.gbnf`); :meth:`matcher` gives a fresh matcher per row.
    Building the tokenizer's table takes about a second, once per process; a grammar compiles in
    about a millisecond and is kept."""

    def __init__(self, tok, vocab_size: int):
        import llguidance
        import llguidance.hf
        self.llg, self.vocab_size = llguidance, vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size)
        self._compiled: dict[Grammar, str] = {}
        self._lock = threading.Lock()

    def compiled(self, g: Grammar) -> str:
        with self._lock:
            if g not in self._compiled:
                grammar = self.llg.grammar_from("gbnf", g.gbnf)
                err = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
                if err:
                    raise ValueError(f"the answer grammar does not compile: {err}")
                self._compiled[g] = grammar
            return self._compiled[g]

    def matcher(self, g: Grammar):
        m = self.llg.LLMatcher(self.tokenizer, self.compiled(g), log_level=0)
        if m.is_error():
            raise ValueError(f"the answer grammar does not compile: {m.get_error()}")
        return m


_GRAMMARS: dict[tuple[int, int], Grammars] = {}
_GRAMMARS_LOCK = threading.Lock()


def grammars_for(tok, vocab_size: int) -> Grammars:
    """The (process-wide) :class:`Grammars` of a tokenizer and logits width."""
    key = (id(tok), vocab_size)
    with _GRAMMARS_LOCK:
        if key not in _GRAMMARS:
            _GRAMMARS[key] = Grammars(tok, vocab_size)
        return _GRAMMARS[key]


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """``-inf`` for every token a row's bitmask (int32 words, bit j of word i = token 32i+j)
    leaves out, in place, plain torch (llguidance's own kernel is a torch.compile kernel that
    takes seconds to build on first use)."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    bits = (bitmask[idx].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    blocked = bits.view(len(rows), -1)[:, :scores.shape[-1]] == 0
    scores[idx.to(scores.device)] = scores[idx.to(scores.device)].masked_fill(blocked.to(scores.device), float("-inf"))


class GrammarProcessor:
    """Logits processor: each row's next token must keep its answer inside its
    :class:`~shoptune.tasks.Grammar` (None: that row is free). A row's matcher takes the token
    chosen at the previous step, then every token its grammar does not allow is masked; once the
    answer is complete only the end token is left, so generation stops there. Rows of one batch
    may have different grammars (the server batches tasks together)."""

    def __init__(self, tok, grammars: Sequence[Grammar | None], prompt_len: int):
        self.tok, self.specs, self.prompt_len = tok, list(grammars), prompt_len
        self.matchers: list | None = None
        self.bitmask = None

    def __call__(self, input_ids, scores):
        if self.matchers is None:
            g = grammars_for(self.tok, scores.shape[-1])
            import llguidance.torch
            self.fill = llguidance.torch.fill_next_token_bitmask
            self.matchers = [g.matcher(spec) if spec is not None else None for spec in self.specs]
            self.bitmask = llguidance.torch.allocate_token_bitmask(len(self.specs), scores.shape[-1])
        elif input_ids.shape[1] > self.prompt_len:
            for row, m in enumerate(self.matchers):
                if m is not None and not m.is_stopped():
                    m.consume_token(int(input_ids[row, -1]))
        # (a stopped matcher's answer is complete: its mask leaves only the end token)
        rows = [row for row, m in enumerate(self.matchers) if m is not None]
        if not rows:
            return scores
        for row in rows:
            self.fill(self.matchers[row], self.bitmask, row)
        apply_bitmask(scores, self.bitmask, rows)
        return scores


class StopAtLineEnd:
    """Stopping criterion: a row is done once a newline follows some content."""

    def __init__(self, tok, prompt_len: int):
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)


def choice_token_ids(tok, choice: str) -> list[int]:
    """The tokens that stand for an option: the word with and without a leading space, as is
    and capitalised (a multi-token word by its first token, unless that token is only
    whitespace: SmolLM2 spells " 2" as " " + "2", and the bare space says nothing about which
    option follows)."""
    ids = set()
    for variant in (choice, " " + choice, choice.capitalize(), " " + choice.capitalize()):
        enc = tok.encode(variant, add_special_tokens=False)
        if enc and (len(enc) == 1 or tok.decode(enc[:1]).strip()):
            ids.add(enc[0])
    return sorted(ids)


def choice_tokens(tok, choices: Sequence[str]) -> dict[int, str]:
    """Token id -> the option it stands for, over all ``choices``. A token that starts more than
    one option (e.g. a shared first piece of two multi-token words) stands for none of them: it
    would make those options tie whatever the model prefers."""
    owners: dict[int, set[str]] = defaultdict(set)
    for c in choices:
        for t in choice_token_ids(tok, c):
            owners[t].add(c)
    return {t: next(iter(cs)) for t, cs in owners.items() if len(cs) == 1}


def best_choice(logits: torch.Tensor, choices: Sequence[str], tok) -> str:
    """The option whose token(s) score highest in one position's logits (the first option when
    no token stands for any option alone)."""
    tokens = choice_tokens(tok, choices)
    if not tokens:
        return choices[0]
    ids = list(tokens)
    best = ids[int(torch.argmax(logits[ids]))]
    return tokens[best]


# ----------------------------------------------------------------------------- prompts

# ----------------------------------------------------------------------------- batches

def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> dict:
    """``input_ids``/``attention_mask`` of token-id rows, left-padded to the longest."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, n - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every row shares (each row keeps at least one token after it)."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    k = 0
    while k < n and all(r[k] == first[k] for r in rows):
        k += 1
    return k


class PrefixCache:
    """Key/value states of shared prompt prefixes, computed once per (adapter, prefix) and reused.

    Prompts of one batch that start with the same tokens (the evaluation protocol's preamble, a
    task's instructions, a chat system prompt) skip that part of prefill: its KV comes from here
    (an LRU bounded by ``max_tokens`` cached prefix tokens), and only the rest of each prompt is
    run. :meth:`inputs` builds the batch: ``[prefix][left padding][suffix]`` with the padding
    masked out and positions continuing from the prefix, which is what ``model(...)`` and
    ``model.generate(...)`` take with ``past_key_values``.
    """

    def __init__(self, max_tokens: int = 16384, min_prefix: int = 16):
        self.max_tokens, self.min_prefix = max_tokens, min_prefix
        self.entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.tokens = 0
        self.hits = self.misses = self.saved_tokens = 0
        self._lock = threading.Lock()

    def _kv(self, model, adapter, prefix: tuple[int, ...], forward_kwargs) -> list:
        key = (adapter, prefix)
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                return self.entries[key]
        from transformers import DynamicCache
        cache = DynamicCache(config=getattr(model, "config", None))
        ids = torch.tensor([list(prefix)], device=model.device)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
              **forward_kwargs(adapter))
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        with self._lock:
            self.misses += 1
            self.entries[key] = kv
            self.tokens += len(prefix)
            while self.tokens > self.max_tokens and len(self.entries) > 1:
                (_, old), _ = self.entries.popitem(last=False)
                self.tokens -= len(old)
        return kv

    def inputs(self, model, rows: Sequence[Sequence[int]], pad_id: int, adapters: Sequence | None = None,
               forward_kwargs=lambda adapter: {}) -> dict:
        """Batch inputs for ``rows`` (token ids); with ``past_key_values`` when they share a
        prefix of at least ``min_prefix`` tokens. ``adapters[i]`` names row i's adapter (the
        cache key; None for one model), ``forward_kwargs(adapter)`` what the model needs to run
        one adapter (peft's ``adapter_names``)."""
        adapters = list(adapters) if adapters is not None else [None] * len(rows)
        p = common_prefix(rows)
        if p < self.min_prefix:
            out = left_padded(rows, pad_id, model.device)
            out["prefix_len"] = 0
            return out
        from transformers import DynamicCache
        prefix = tuple(rows[0][:p])
        per_adapter = {a: self._kv(model, a, prefix, forward_kwargs) for a in dict.fromkeys(adapters)}
        cache = DynamicCache(config=getattr(model, "config", None))
        for layer in range(len(per_adapter[adapters[0]])):
            k = torch.cat([per_adapter[a][layer][0] for a in adapters])
            v = torch.cat([per_adapter[a][layer][1] for a in adapters])
            cache.update(k, v, layer)
        rest = left_padded([r[p:] for r in rows], pad_id)
        n = len(rows)
        ids = torch.cat([torch.tensor([list(prefix)] * n, dtype=torch.long), rest["input_ids"]], 1)
        mask = torch.cat([torch.ones((n, p), dtype=torch.long), rest["attention_mask"]], 1)
        with self._lock:
            self.saved_tokens += p * n
        return {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device),
                "past_key_values": cache, "prefix_len": p}

    def stats(self) -> dict:
        return {"entries": len(self.entries), "tokens": self.tokens, "hits": self.hits,
                "misses": self.misses, "saved_prefill_tokens": self.saved_tokens}


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (0 on each row's first one)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def last_logits(model, batch: dict, **kwargs) -> torch.Tensor:
    """Next-token logits after each row of ``batch`` (from :meth:`PrefixCache.inputs` or
    :func:`left_padded`): one forward pass over what the cache does not hold."""
    p = batch.get("prefix_len", 0)
    pos = positions(batch["attention_mask"])
    out = model(input_ids=batch["input_ids"][:, p:], attention_mask=batch["attention_mask"],
                position_ids=pos[:, p:], past_key_values=batch.get("past_key_values"),
                logits_to_keep=1, **kwargs)
    return out.logits[:, -1, :].float()


PROTOCOLS = ("starter-kit", "chat", "fewshot")


def build_prompts(records: Sequence[Record], protocol: str, tokenizer=None,
                  render: Callable[[Record], str] | None = None) -> list[str]:
    """The text each question is sent as.

    Each question is rendered through its task card's ``prompt`` (the same text at training,
    evaluation and serving time); a record of a task without a card is its ``input_field``.
    starter-kit: the KDD Cup prefix + question (no chat template). chat: the tokenizer's chat
    template with the prefix as system message. fewshot: starter-kit with one solved question of
    the same task (another question of the evaluated set) in front.
    """
    render = render or tasks.render
    if protocol == "starter-kit":
        return [STARTER_KIT_PREFIX + render(r) for r in records]
    if protocol == "chat":
        if tokenizer is None:
            return [render(r) for r in records]
        return [tokenizer.apply_chat_template(
            [{"role": "system", "content": STARTER_KIT_PREFIX.strip()},
             {"role": "user", "content": render(r)}], tokenize=False, add_generation_prompt=True)
            for r in records]
    if protocol == "fewshot":
        by_task: dict[str, list[Record]] = defaultdict(list)
        for r in records:
            by_task[r.task].append(r)
        out = []
        for r in records:
            others = [o for o in by_task[r.task] if o.id != r.id]
            shot = ""
            if others:
                o = others[0]
                gold = o.output_field if isinstance(o.output_field, str) else \
                    ", ".join(map(str, o.output_field)) if isinstance(o.output_field, list) else str(o.output_field)
                shot = render(o) + gold + "\n\n"
            out.append(STARTER_KIT_PREFIX + shot + render(r))
        return out
    raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
