"""Prefix caching (#11): prompts of a batch that share a prefix reuse its KV, and the answers do
not change. In process, float32, the tiny model with two LoRA adapters in a mixed batch."""
import asyncio

import pytest

from shoptune.decoding import PrefixCache, common_prefix
from shoptune.serve.engine import Engine, Job

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)
SYSTEM = ("You are a helpful online shopping assistant. Please answer the following question about "
          "online shopping and follow the given instructions.\n\n")
QUESTIONS = ["Which tent is best for two people?", "Name a running shoe.",
             "What goes well with a camping stove and a small pot?", "Is a wool sweater warm?"]


def test_common_prefix_keeps_one_token_per_row():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert common_prefix([[7, 1], [8, 1]]) == 0


def run(engine, jobs):
    async def go():
        for j in jobs:
            engine.submit(j)
        return await asyncio.gather(*(engine.complete(j) for j in jobs))
    return asyncio.run(go())


def answers(engine, tok, kind):
    models = [None, "good", "good2", "good"]
    jobs = []
    for q, m in zip(QUESTIONS, models):
        ids = tok.encode(SYSTEM + q)
        jobs.append(Job(ids, m, kind="choice", choices=tuple("0123")) if kind == "choice"
                    else Job(ids, m, max_new_tokens=8))
    return run(engine, jobs)


@pytest.fixture(scope="module")
def engines(tiny):
    from shoptune.models import load
    out = {}
    for cached in (True, False):
        model, tok = load(str(tiny["base"]), dtype="fp32")
        e = Engine(model, tok, base_name="tiny", max_wait=0.3, prefix_cache=cached)
        e.load_adapter("good", tiny["good"])
        e.load_adapter("good2", tiny["good2"])
        out[cached] = e
    yield out
    for e in out.values():
        e.stop()


@pytest.mark.parametrize("kind", ["choice", "generate"])
def test_mixed_adapter_batch_answers_equal_with_and_without_the_cache(engines, kind):
    tok = engines[True].tok
    with_cache = answers(engines[True], tok, kind)
    assert with_cache == answers(engines[False], tok, kind)
    assert len(set(with_cache)) > 1  # the rows really differ (adapters, questions)
    st = engines[True].prefix_cache.stats()
    assert st["saved_prefill_tokens"] > 0 and st["entries"] >= 3  # one per (adapter, prefix)
    again = engines[True].prefix_cache.stats()["hits"]
    answers(engines[True], tok, kind)
    assert engines[True].prefix_cache.stats()["hits"] > again  # the second batch reuses them


def test_cache_is_bounded_and_evicts_least_recent(tiny):
    from shoptune.models import load
    model, tok = load(str(tiny["base"]), dtype="fp32")
    cache = PrefixCache(max_tokens=40, min_prefix=4)
    for n in range(5):
        rows = [tok.encode(f"{n} " * 12 + "a"), tok.encode(f"{n} " * 12 + "b c")]
        batch = cache.inputs(model, rows, 0)
        assert batch["prefix_len"] >= 12 and batch["past_key_values"].get_seq_length() == batch["prefix_len"]
    assert cache.tokens <= 40 and len(cache.entries) < 5


def test_adapter_reload_under_the_same_name_drops_its_cached_prefixes(engines, tiny):
    e = engines[True]
    tok = e.tok
    answers(e, tok, "generate")
    assert e.prefix_cache.stats()["entries"] > 0
    asyncio.run(e.unload_adapter("good2"))
    assert e.prefix_cache.stats()["entries"] == 0
    e.load_adapter("good2", tiny["good2"])


def test_eval_backend_answers_equal_with_and_without_the_cache(tiny):
    """``shoptune eval --prefix-cache``: every plan kind (option choice, number lists under the
    constraint, line-end generation) gives the same answers."""
    from shoptune.decoding import build_prompts
    from shoptune.tasks import plan_for
    from shoptune.eval.backends import LocalBackend
    from shoptune.models import load
    from shoptune.records import Record

    def rec(task_type, metric, text):
        return Record(input_field=text, output_field=None, task_type=task_type, metric=metric,
                      task="t", capability="concept_understanding", source="test")
    recs = [rec("multiple-choice", "accuracy", "Which is a shoe?\n0. tent\n1. sneaker\n2. pot\nAnswer: "),
            rec("multiple-choice", "accuracy", "Which is warm?\n0. ice\n1. wool\n2. fan\n3. snow\nAnswer: "),
            rec("retrieval", "hit rate@3", "Pick 3 for a hiker:\n1. boots\n2. map\n3. lamp\n4. sofa\nOutput: "),
            rec("ranking", "ndcg", "Rank for 'tent':\n1. tent\n2. pole\n3. cup\n4. pen\n5. rope\nOutput: "),
            rec("generation", "rougel", "Summarise: a red waterproof jacket in size M."),
            rec("generation", "rougel", "Summarise: blue running shoes with foam soles.")]
    prompts, plans = build_prompts(recs, "starter-kit"), [plan_for(r) for r in recs]
    model, tok = load(str(tiny["base"]), dtype="fp32")
    plain = LocalBackend(model, tok, batch_size=8).run(prompts, plans)
    cached = LocalBackend(model, tok, batch_size=8, prefix_cache=True)
    assert cached.run(prompts, plans) == plain
    assert cached.prefix_stats["saved_prefill_tokens"] > 0 and cached.prefix_stats["misses"] >= 1
