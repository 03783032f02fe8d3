"""The engine against bad adapters, bad rows and faults (issue #9), in process on a tiny model.

Each test reproduces one reported defect: a failed adapter load must leave the live model exactly
as it was, concurrent loads under one name must not corrupt each other, one row's failure must not
fail its batch, stop strings must cut exactly, and ``health()`` must tell when the engine cannot
serve.
"""
import asyncio
import random
import threading
import time

import pytest
import torch

from shoptune.serve.engine import (AdapterError, Engine, EngineUnavailable, Job, RowControl,
                                   RowFailed, StopMatcher)

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)
PROMPT = "The best running shoe is"


@pytest.fixture(scope="module")
def tok(tiny):
    from shoptune.models import load_tokenizer
    return load_tokenizer(str(tiny["base"]))


@pytest.fixture()
def engine(tiny):
    from shoptune.models import load
    model, tok = load(str(tiny["base"]), dtype="fp32")
    e = Engine(model, tok, base_name="tiny", max_wait=0.3)
    yield e
    e.stop()


def run(engine, *jobs):
    """Submit the jobs together (one batch: the engine waits max_wait for company); texts or errors."""
    async def go():
        for j in jobs:
            engine.submit(j)
        return await asyncio.gather(*(engine.complete(j) for j in jobs), return_exceptions=True)
    return asyncio.run(go())


def gen(engine, model=None, n=6, prompt=PROMPT):
    out = run(engine, Job(engine.tok.encode(prompt), model, max_new_tokens=n))[0]
    if isinstance(out, BaseException):
        raise out
    return out


def structure(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def assert_plain(engine, before_structure, before_text):
    from peft.tuners.tuners_utils import BaseTunerLayer
    assert not engine.is_peft and not hasattr(engine.model, "peft_config")
    assert not any(isinstance(m, BaseTunerLayer) for m in engine.model.modules())
    assert structure(engine.model) == before_structure
    assert gen(engine) == before_text
    assert engine.health() == {"live": True, "ready": True, "reason": None}


# ----------------------------------------------------------------------------- item 1, 2

@pytest.mark.parametrize("bad,fragment", [
    ("mismatch", "was trained for a different base model ("),
    ("corrupt", "not a readable safetensors file"),
    ("prompt_tuning", "a PROMPT_TUNING adapter; only LORA adapters"),
])
def test_bad_first_load_is_refused_and_leaves_the_model_as_before(engine, tiny, bad, fragment):
    before_structure, before_text = structure(engine.model), gen(engine)
    with pytest.raises(AdapterError) as e:
        engine.load_adapter("x", tiny[bad])
    assert fragment in e.value.message and e.value.status == 400
    if bad == "mismatch":  # names both models and the first differing layer
        assert str(tiny["base"].parent / "tiny-32") in e.value.message and "not tiny:" in e.value.message
        assert "has input size 64 in the base but 32 in the adapter" in e.value.message
    assert "x" not in engine.models()
    assert_plain(engine, before_structure, before_text)
    engine.load_adapter("good", tiny["good"])  # and a good adapter still loads and works
    assert gen(engine, "good") != before_text and gen(engine) == before_text


@pytest.fixture()
def broken_state_dict(monkeypatch):
    """Make peft fail after it injected the LoRA layers (what a load failing midway looks like)."""
    import peft.peft_model

    def boom(*a, **kw):
        raise RuntimeError("boom: injected failure while copying the weights")
    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", boom)
    return monkeypatch


def test_a_load_failing_midway_is_rolled_back(engine, tiny, broken_state_dict):
    before_structure, before_text = structure(engine.model), gen(engine)
    with pytest.raises(AdapterError, match="cannot load adapter: boom"):
        engine.load_adapter("good", tiny["good"])  # first adapter: peft wrapped the plain model
    assert_plain(engine, before_structure, before_text)
    broken_state_dict.undo()
    engine.load_adapter("good", tiny["good"])
    good_text, peft_structure = gen(engine, "good"), structure(engine.model)
    import peft.peft_model
    broken_state_dict.setattr(peft.peft_model, "set_peft_model_state_dict",
                              lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom again")))
    with pytest.raises(AdapterError, match="boom again"):
        engine.load_adapter("good2", tiny["good2"])  # a second adapter: only it is taken out
    assert "good2" not in engine.model.peft_config and structure(engine.model) == peft_structure
    assert gen(engine, "good") == good_text and gen(engine) == before_text
    assert engine.models() == ["tiny", "good"] and engine.health()["ready"]


# ----------------------------------------------------------------------------- item 3

@pytest.mark.parametrize("second", ["mismatch", "good2"])
def test_concurrent_loads_under_one_name(engine, tiny, monkeypatch, second):
    """Both calls pass their file checks at the same time, then race for the name."""
    import shoptune.serve.engine as E
    real = E.check_adapter_dir
    barrier = threading.Barrier(2, timeout=1)

    def slow_check(path):
        real(path)
        try:
            barrier.wait()  # (with the name check under the lock, the second caller never gets here)
        except threading.BrokenBarrierError:
            pass
    monkeypatch.setattr(E, "check_adapter_dir", slow_check)
    base_text = gen(engine)
    results = {}

    def load(kind):
        try:
            engine.load_adapter("shared", tiny[kind])
            results[kind] = "ok"
        except AdapterError as e:
            results[kind] = e.message

    threads = [threading.Thread(target=load, args=(k,)) for k in ("good", second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == sorted(["good", second])
    assert list(results.values()).count("ok") == 1, results
    winner = next(k for k, v in results.items() if v == "ok")
    loser = second if winner == "good" else "good"
    assert "already loaded" in results[loser] or "different base model" in results[loser]
    monkeypatch.undo()
    engine.load_adapter("reference", tiny[winner])  # the same folder, loaded alone
    assert gen(engine, "shared") == gen(engine, "reference")
    assert gen(engine) == base_text and engine.models() == ["tiny", "shared", "reference"]


# ----------------------------------------------------------------------------- item 4

@pytest.mark.parametrize("poison", [1e-45, float("nan")])
def test_a_poisoned_row_fails_alone(engine, poison):
    ids = engine.tok.encode(PROMPT)

    def batch(t):
        return [Job(ids, max_new_tokens=6), Job(ids, max_new_tokens=6, temperature=t),
                Job(ids, max_new_tokens=6, temperature=0.0)]
    clean = run(engine, *batch(0.0))
    assert all(isinstance(x, str) and x for x in clean)
    out = run(engine, *batch(poison))
    assert isinstance(out[1], RowFailed) and out[1].status == 500, out
    assert "generation failed for this request" in out[1].message
    assert out[0] == clean[0] and out[2] == clean[2]  # the other rows of the batch: unharmed
    assert engine.health()["ready"] and engine.last_error is None


# ----------------------------------------------------------------------------- item 5

def brute_force(steps: list[str], stops) -> tuple[str, bool]:
    """What stop handling must give: at the first step whose text holds a stop string, the text
    up to the earliest one (the pre-automaton implementation, one find per stop per step)."""
    for text in steps:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[:min(hits)], True
    return steps[-1], False


def drive(tok, text, stops):
    ids = tok.encode(text, add_special_tokens=False)
    job = Job([1], stop=tuple(stops), max_new_tokens=len(ids) + 1)
    deltas = []
    job._post = lambda event: deltas.append(event)
    control = RowControl([job], tok, {tok.eos_token_id})
    steps = []
    for t in ids:
        control(torch.tensor([[t]]), None)
        steps.append(tok.decode(ids[:len(steps) + 1], skip_special_tokens=True))
        streamed = "".join(v for k, v in deltas if k == "delta")
        assert job.text.startswith(streamed) or control.finished[0]
        if control.finished[0]:
            break
    control.close()
    streamed = "".join(v for k, v in deltas if k == "delta")
    assert streamed == job.text  # streamed pieces add up to the answer, no stop prefix leaked
    return job.text, job.finish_reason, steps


TEXT = "Hello 😀 world, the running shoe. Costs 5 €, ships 3 days."


@pytest.mark.parametrize("stops,expected", [
    (["nning sh"], "Hello 😀 world, the ru"),  # spans ' running' + ' shoe'
    (["😀 wor"], "Hello "),  # spans the emoji's two byte tokens and ' world'
    (["the running shoe.", "running"], "Hello 😀 world, the "),  # first complete match wins
    ([", the", "the"], "Hello 😀 world"),  # end together: the earlier start wins
    (["€, sh"], "Hello 😀 world, the running shoe. Costs 5 "),
    (["not in the text", "zzz"], TEXT),
])
def test_stop_strings_cut_exactly_across_token_boundaries(tok, stops, expected):
    text, reason, steps = drive(tok, TEXT, stops)
    assert text == expected
    assert reason == ("stop" if expected != TEXT else "length")
    assert (text, reason == "stop") == brute_force(steps, stops)
    junk = [f"junk{i} zz" for i in range(31)]  # 31 stops that never match change nothing
    assert drive(tok, TEXT, junk + stops)[0] == expected


def test_stop_matching_equals_brute_force_on_random_stop_sets(tok):
    rng = random.Random(0)
    for _ in range(200):
        stops = []
        for _ in range(rng.randint(1, 6)):
            a = rng.randrange(len(TEXT))
            stops.append(TEXT[a:a + rng.randint(1, 8)] if rng.random() < 0.7 else f"~{rng.random()}")
        text, _, steps = drive(tok, TEXT, stops)
        assert text == brute_force(steps, stops)[0], stops


def test_stop_matcher_work_per_step_does_not_grow_with_the_stop_list():
    """Feeding one more character visits a bounded number of automaton states, with 1 or 32 stops."""
    def visits(n_stops):
        m = StopMatcher([f"{i:03d}" + "x" * 100 for i in range(n_stops)] + ["needle"])
        text, count = "", 0
        real = m.goto

        class Counting(list):
            def __getitem__(self, i):
                nonlocal count
                count += 1
                return real[i]
        m.goto = Counting(real)
        for ch in "hay " * 50 + "needle":
            text += ch
            start, _ = m.feed(text)
        assert start == len(text) - len("needle")
        return count
    assert visits(32) == visits(1)


# ----------------------------------------------------------------------------- item 7

def test_health_follows_the_engine(engine, monkeypatch):
    assert engine.health() == {"live": True, "ready": True, "reason": None}
    engine.probe_interval = 0.1

    def broken_forward(*a, **kw):
        raise RuntimeError("injected: the model cannot compute")
    monkeypatch.setattr(engine.model, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="injected"):
        gen(engine)
    h = engine.health()
    assert h["live"] and not h["ready"] and "injected: the model cannot compute" in h["reason"]
    monkeypatch.undo()  # the fault goes away: the idle worker's probe sees it and is ready again
    deadline = time.monotonic() + 10
    while not engine.health()["ready"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.health()["ready"] and gen(engine)

    def die(batch):
        raise SystemExit("injected: worker killed")
    monkeypatch.setattr(engine, "_run", die)
    with pytest.raises(EngineUnavailable, match="worker killed"):
        gen(engine)  # the job in hand fails instead of hanging
    h = engine.health()
    assert not h["live"] and not h["ready"] and "worker killed" in h["reason"]
    with pytest.raises(EngineUnavailable):
        engine.submit(Job([1]))
