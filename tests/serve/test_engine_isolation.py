"""One request or one adapter must not hurt the others (issue #20, items 1-3), in process on a tiny
model: a seed torch cannot take fails its own row only; adapters peft cannot apply per row of a
mixed batch (DoRA, modules_to_save) are refused at load, and one that slips past the checks is
taken out again by the mixed-batch check after loading; a batch that fails anyway is run again
apart, so only the rows that cause the failure fail; ``health()`` checks the base model and every
adapter, so a model that cannot serve an adapter does not report ready.
"""
import asyncio
import subprocess
import sys

import pytest

from shoptune.serve.engine import AdapterError, Engine, Job, RowFailed

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)
PROMPT = "The best running shoe is"


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


def job(engine, model=None, prompt=PROMPT, **kw):
    return Job(engine.tok.encode(prompt), model, max_new_tokens=kw.pop("max_new_tokens", 6), **kw)


def structure(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


# ----------------------------------------------------------------------------- item 1

@pytest.mark.parametrize("seed", [2**64, -2**63 - 1])
def test_a_seed_torch_cannot_take_fails_its_row_only(engine, seed):
    clean = run(engine, job(engine), job(engine, temperature=1.0, seed=7))
    out = run(engine, job(engine), job(engine, temperature=1.0, seed=7),
              job(engine, temperature=1.0, seed=seed))
    assert isinstance(out[2], RowFailed) and "Overflow" in out[2].message, out
    assert out[:2] == clean[:2]  # the greedy row and the seeded row next to it: as without it
    assert engine.health() == {"live": True, "ready": True, "reason": None}
    assert engine.last_error is None


# ----------------------------------------------------------------------------- items 2, 3

@pytest.mark.parametrize("kind,fragment", [
    ("dora", "it is a DoRA adapter (use_dora: True)"),
    ("modules_to_save", "it replaces whole base modules (modules_to_save: ['lm_head'])"),
])
@pytest.mark.parametrize("first", [True, False])
def test_an_adapter_peft_cannot_batch_per_row_is_refused_at_load(engine, tiny, kind, fragment, first):
    if not first:
        engine.load_adapter("good", tiny["good"])
    before, shape = run(engine, job(engine), job(engine, "good" if not first else None)), structure(engine.model)
    with pytest.raises(AdapterError) as e:
        engine.load_adapter("bad", tiny[kind])
    assert e.value.status == 400 and e.value.param == "lora_path"
    assert "cannot be served next to other adapters: " + fragment in e.value.message
    assert structure(engine.model) == shape and "bad" not in engine.models()
    assert run(engine, job(engine), job(engine, "good" if not first else None)) == before
    assert engine.health()["ready"]


@pytest.mark.parametrize("kind,first", [("dora", True), ("dora", False), ("modules_to_save", False)])
def test_an_adapter_that_slips_past_the_checks_is_taken_out_by_the_mixed_batch_check(
        engine, tiny, monkeypatch, kind, first):
    """The load-time checks switched off: the one-token mixed batch after loading catches it."""
    skip_checks(monkeypatch)
    if not first:
        engine.load_adapter("good", tiny["good"])
    before, shape = run(engine, job(engine), job(engine, "good" if not first else None)), structure(engine.model)
    with pytest.raises(AdapterError) as e:
        engine.load_adapter("bad", tiny[kind])
    assert e.value.param == "lora_path" and "a one-token batch of it with the base model" in e.value.message
    assert "it was not loaded" in e.value.message
    assert structure(engine.model) == shape and engine.models() == ["tiny"] + ([] if first else ["good"])
    assert run(engine, job(engine), job(engine, "good" if not first else None)) == before
    assert engine.health() == {"live": True, "ready": True, "reason": None}


def test_a_modules_to_save_adapter_that_slipped_in_alone_keeps_others_out(engine, tiny, monkeypatch):
    """Alone it batches with the base model; the next adapter is the one the check refuses."""
    skip_checks(monkeypatch)
    engine.load_adapter("mts", tiny["modules_to_save"])
    before = run(engine, job(engine), job(engine, "mts"))
    with pytest.raises(AdapterError, match=r"with the base model and mts failed \(KeyError: 'good'\)"):
        engine.load_adapter("good", tiny["good"])
    assert engine.models() == ["tiny", "mts"] and run(engine, job(engine), job(engine, "mts")) == before
    assert engine.health()["ready"]


def skip_checks(monkeypatch):
    import shoptune.models as M
    real = M.check_adapter
    monkeypatch.setattr(M, "check_adapter", lambda *a, per_row=False, **kw: real(*a, **kw))


def test_startup_with_an_unbatchable_adapter_fails_in_one_line(tiny):
    p = subprocess.run([sys.executable, "-m", "shoptune.cli", "serve", "--model", str(tiny["base"]),
                        "--dtype", "float32", "--adapter", f"d={tiny['dora']}"],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "cannot be served next to other adapters" in out and "DoRA" in out, out
    assert "Traceback" not in out


# ----------------------------------------------------------------------------- item 3: what slips through

def test_a_failing_adapter_fails_its_own_rows_and_health_says_so(engine, tiny):
    engine.probe_interval = 0.1
    engine.load_adapter("good", tiny["good"])
    engine.load_adapter("good2", tiny["good2"])
    together = run(engine, job(engine), job(engine, "good"), job(engine, "good2"), job(engine, "good2"))
    alone = [run(engine, job(engine))[0], run(engine, job(engine, "good"))[0]]  # as they run again
    layer = engine.model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["good2"]

    def broken(*a, **kw):
        raise RuntimeError("injected: good2 cannot compute")
    layer.forward = broken
    out = run(engine, job(engine), job(engine, "good"), job(engine, "good2"), job(engine, "good2"))
    assert out[:2] == alone, out  # the base model's and good's rows: unharmed
    assert all(isinstance(x, RuntimeError) and "good2 cannot compute" in str(x) for x in out[2:]), out
    h = engine.health()  # the model check runs every adapter: not ready while good2 is broken
    assert h["live"] and not h["ready"] and "good2 cannot compute" in h["reason"]
    del layer.forward  # the fault goes away: the idle worker's check sees it
    assert wait_ready(engine)
    assert run(engine, job(engine), job(engine, "good"), job(engine, "good2"), job(engine, "good2")) == together


def test_a_request_that_fails_its_batch_fails_alone(engine, monkeypatch):
    """A failure tied to one request (not caught per row): its batch-mates of the same model get
    their answers from a run without it."""
    poison = engine.tok.encode(" zebra", add_special_tokens=False)[0]
    real = engine._generate

    def generate(jobs):
        if any(poison in j.prompt_ids for j in jobs):
            raise RuntimeError("injected: this prompt breaks the batch")
        return real(jobs)
    clean = [run(engine, job(engine))[0], run(engine, job(engine, prompt="Hello there"))[0]]
    monkeypatch.setattr(engine, "_generate", generate)
    out = run(engine, job(engine), job(engine, prompt="A zebra"), job(engine, prompt="Hello there"))
    assert [out[0], out[2]] == clean and isinstance(out[1], RuntimeError), out
    assert wait_ready(engine)  # the model check passes: a request's fault, not the model's


def wait_ready(engine, timeout=10.0) -> bool:
    """(The check after a failed batch runs once its clients have their answers.)"""
    import time
    deadline = time.monotonic() + timeout
    while not engine.health()["ready"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine.health()["ready"]
