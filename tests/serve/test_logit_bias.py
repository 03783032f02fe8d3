"""OpenAI's ``logit_bias`` on the built-in engine, shoptune's ``shoptune_plan`` extension of
``/v1/completions``, and what ``/v1/tasks/{task}`` says about its request body and takes as task
names (issue #21 item 4, issue #24 item 6). A tiny float32 model under a real uvicorn in a thread
of this process (as test_request_hardening.py), and its engine directly for batch-mates.

Log-probabilities with a bias follow vLLM's default (``--logprobs-mode raw_logprobs``: computed
from the model's raw output, before any logits processor such as ``logit_bias``; vLLM's V1 guide,
"Semantic Changes to Logprobs"): a bias changes which token is chosen, not the log-probabilities
reported for it and its alternatives.
"""
import asyncio
import json
import re
from types import SimpleNamespace

import httpx
import pytest

from shoptune.serve.engine import Job

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)
PROMPT = "The best running shoe is"
J = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def live(tiny):

    from shoptune.models import load
    from shoptune.serve.app import ServeSettings, build_app
    from shoptune.serve.engine import Engine
    from shoptune.serve.testing import app_in_thread

    model, tok = load(str(tiny["base"]), dtype="fp32")
    # max_wait: requests sent together share a batch
    engine = Engine(model, tok, base_name="tiny", max_queue=16, max_wait=0.3)
    engine.load_adapter("good", tiny["good"])
    settings = ServeSettings(max_new_tokens=64)
    with app_in_thread(build_app(engine, settings)) as url:
        yield SimpleNamespace(url=url, engine=engine, tok=tok, settings=settings)


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def complete(http, **body):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                           "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def run(engine, *jobs):
    """Submit the jobs together (one batch: the engine waits max_wait for company); their
    generated token ids."""
    async def go():
        for j in jobs:
            engine.submit(j)
        await asyncio.gather(*(engine.complete(j) for j in jobs))
        return [list(j.gen_ids) for j in jobs]
    return asyncio.run(go())


def job(live, model=None, **kw):
    return Job(live.tok.encode(PROMPT), model, max_new_tokens=kw.pop("max_new_tokens", 5), **kw)


def unchosen_token(live) -> int:
    """A plain word token greedy decoding of PROMPT does not write."""
    greedy = set(run(live.engine, job(live))[0])
    return next(t for t in (live.tok.encode(w, add_special_tokens=False)[0]
                            for w in (" shoe", " red", " box", " cat")) if t not in greedy)


# ----------------------------------------------------------------------------- the bias

def test_plus_100_makes_greedy_write_the_token_at_every_position(http, live):
    x = unchosen_token(live)
    want = live.tok.decode([x] * 4)
    assert complete(http, logit_bias={str(x): 100})["text"] == want
    assert complete(http, model="good", logit_bias={str(x): 100})["text"] == want
    r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "temperature": 0,
                                                "messages": [{"role": "user", "content": "hi"}],
                                                "logit_bias": {str(x): 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want, r.text
    # (sampled rows too: a +100 token takes all the probability)
    assert complete(http, logit_bias={str(x): 100}, temperature=1.0, seed=3)["text"] == want


def test_minus_100_bans_the_tokens_greedy_and_sampling_would_write(live):
    for kw in ({}, {"temperature": 1.0, "seed": 11}):
        plain = run(live.engine, job(live, **kw))[0]
        banned = run(live.engine, job(live, logit_bias={t: -100.0 for t in plain}, **kw))[0]
        assert len(banned) == 5 and not set(banned) & set(plain), (plain, banned)


def test_a_rows_bias_never_touches_its_batch_mates(live):
    """Greedy and seeded rows of the base model and an adapter: as alone, whatever biased rows
    share their batch; the biased rows: as alone too."""
    x = unchosen_token(live)
    mates = lambda: [job(live), job(live, "good"), job(live, temperature=1.0, seed=5),
                     job(live, "good", temperature=0.8, top_p=0.9, seed=6)]
    alone = [run(live.engine, j)[0] for j in mates()]
    biased = lambda: [job(live, logit_bias={x: 100.0}), job(live, "good", logit_bias={t: -100.0 for t in alone[1]}),
                      job(live, temperature=1.0, seed=5, logit_bias={x: 7.5, alone[2][0]: -100.0})]
    biased_alone = [run(live.engine, j)[0] for j in biased()]
    together = run(live.engine, *mates(), *biased())
    assert together[:4] == alone
    assert together[4:] == biased_alone
    assert together[4] == [x] * 5 and not set(together[5]) & set(alone[1])
    assert together[6] != alone[2] and together[6][0] != alone[2][0]  # its own bias, its own draw


def test_logprobs_are_the_models_own_as_vllm_reports_them_by_default(http, live):
    """vLLM's default raw_logprobs: the chosen token's log-probability and the alternatives are
    those of the unbiased distribution (equal to scoring the same tokens without a bias)."""
    x = unchosen_token(live)
    ids = live.tok.encode(PROMPT)
    biased = complete(http, prompt=ids, max_tokens=1, logprobs=3, logit_bias={str(x): 100})
    plain = complete(http, prompt=ids, max_tokens=1, logprobs=3)
    scored = complete(http, prompt=ids + [x], max_tokens=0, echo=True, logprobs=0)
    lp = biased["logprobs"]
    assert lp["tokens"] == [live.tok.decode([x])]
    assert lp["token_logprobs"][0] == pytest.approx(scored["logprobs"]["token_logprobs"][-1], abs=1e-4)
    assert lp["token_logprobs"][0] < plain["logprobs"]["token_logprobs"][0]  # not the model's choice
    top, plain_top = lp["top_logprobs"][0], plain["logprobs"]["top_logprobs"][0]
    assert set(top) == set(plain_top) | {live.tok.decode([x])}  # the top 3, plus the chosen token
    for k, v in plain_top.items():
        assert top[k] == pytest.approx(v, abs=1e-4)


@pytest.mark.parametrize("bias,param,fragment", [
    ({"abc": 5}, "logit_bias", "key 'abc' is not a token id"),
    ({"-1": 5}, "logit_bias", "key '-1' is not a token id"),
    ({"5": 100.5}, "logit_bias.5", "less than or equal to 100"),
    ({"5": -101}, "logit_bias.5", "greater than or equal to -100"),
    ({"5": True}, "logit_bias.5", "valid number"),
    ({"5": "1"}, "logit_bias.5", "valid number"),
    ({str(i): 1 for i in range(1025)}, "logit_bias", "at most 1024 entries (got 1025)"),
    ({"57": 100, "057": -100}, "logit_bias", "token id 57 is given twice ('57' and '057')"),  # (#31 item 19)
    ([5, 1], "logit_bias", "valid dictionary"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_logit_bias_is_400_naming_it(http, bias, param, fragment, path):
    body = {"model": "tiny", "max_tokens": 2, "logit_bias": bias}
    body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    assert_400(http.post(path, json=body), param, fragment)


def test_logit_bias_ids_outside_the_vocabulary_and_non_finite_values_are_400(http, live):
    vocab = len(live.tok)
    for path, extra in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = http.post(path, json={"model": "tiny", "max_tokens": 2, "logit_bias": {"5": 1, str(vocab): 0}, **extra})
        assert_400(r, "logit_bias", f"token id {vocab} is not in the vocabulary (ids 0..{vocab - 1})")
        for value in ("NaN", "Infinity", "-Infinity"):  # (Python's JSON parser takes these)
            body = json.dumps({"model": "tiny", "max_tokens": 2, **extra})[:-1] + f', "logit_bias": {{"5": {value}}}}}'
            assert_400(http.post(path, content=body, headers=J), "logit_bias.5", "finite number")
    assert http.get("/health").status_code == 200
    assert complete(http, logit_bias={"0": 0})["text"] == complete(http)["text"]  # zeros: no bias


# ----------------------------------------------------------------------------- shoptune_plan

def task_prompt_ids(live, task: str, inp: dict) -> tuple[list[int], object]:
    """The token ids and plan the task endpoint decodes ``inp`` with."""
    from shoptune.decoding import build_prompts
    from shoptune.serve import tasks as task_io
    from shoptune.tasks import all_cards
    card = all_cards()[task]
    parsed = task_io.input_model(card).model_validate(inp)
    rec = task_io.to_record(card, parsed)
    prompt = build_prompts([rec], live.settings.protocol, live.tok, render=lambda r: card.render(r.input_field))[0]
    return live.tok.encode(prompt, add_special_tokens=False), task_io.plan(card, parsed, rec)


@pytest.mark.parametrize("task,inp", [
    ("shopbench_task3", {"question": "Which are shoes?", "candidates": ["hat", "boot", "sneaker", "lamp", "sandal"]}),
    ("shopbench_task3", {"input_field": "Which are shoes?\n1. hat\n5. boot\n12. sneaker\n40. lamp\nOutput: "}),
    ("shopbench_task12", {"question": "Rank for 'red shoes'.", "candidates": ["a", "b", "c", "d", "e"]}),
    ("shopbench_task4", {"text": "asus laptop 15 inch", "entity_type": "brand"}),
])
@pytest.mark.parametrize("model", ["tiny", "good"])
def test_shoptune_plan_decodes_a_completion_as_the_task_endpoint(http, live, task, inp, model):
    from shoptune.serve.upstream import shoptune_plan
    ids, plan = task_prompt_ids(live, task, inp)
    r = http.post(f"/v1/tasks/{task}", json={"model": model, "input": inp})
    assert r.status_code == 200, r.text
    c = complete(http, model=model, prompt=ids, max_tokens=plan.max_new_tokens, shoptune_plan=shoptune_plan(plan))
    assert c["text"].strip().split("\n")[0].strip() == r.json()["raw"]
    if plan.numeric:
        assert re.fullmatch(r"\d+(, \d+)*", r.json()["raw"]), r.json()
        plain = complete(http, model=model, prompt=ids, max_tokens=plan.max_new_tokens)
        assert plain["text"] != c["text"]  # (the random model alone writes no number list)


@pytest.mark.parametrize("plan,param,fragment", [
    ({"numeric": True, "max_new_tokens": 5}, "shoptune_plan.max_new_tokens", "Extra inputs are not permitted"),
    ({"kind": "choice"}, "shoptune_plan.kind", "'generate'"),
    ({"numeric": True, "values": [0, 3]}, "shoptune_plan.values.0", "greater than or equal to 1"),
    ({"numeric": True, "max_value": 10**40}, "shoptune_plan.max_value", "less than or equal to"),
    ({"numeric": "yes"}, "shoptune_plan.numeric", "valid boolean"),
    ({"count": 0}, "shoptune_plan.count", "greater than or equal to 1"),
])
def test_bad_shoptune_plan_is_400_naming_the_field(http, plan, param, fragment):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "shoptune_plan": plan})
    assert_400(r, param, fragment)


def test_shoptune_plan_on_chat_is_400(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                "shoptune_plan": {"numeric": True}})
    assert_400(r, "shoptune_plan", "an extension of /v1/completions only")


def assert_400(r, param, fragment=""):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


# ----------------------------------------------------------------------------- /v1/tasks/{task} (#24 item 6)

MC = {"question": "Which is a shoe?", "options": ["apple", "sneaker", "lamp"]}


def test_task_schema_describes_the_whole_request_body(http):
    info = http.get("/v1/tasks/shopbench_task2").json()
    body = info["request_schema"]
    assert body["type"] == "object" and body["required"] == ["input"] and body["additionalProperties"] is False
    assert set(body["properties"]) == {"model", "input"}
    ref = body["properties"]["input"]["$ref"].rsplit("/", 1)[1]
    assert body["$defs"][ref]["properties"].keys() == info["input_schema"]["properties"].keys() \
        == {"input_field", "question", "options"}
    assert "under `input`" in http.get("/openapi.json").text  # (the field's description says so)
    listing = http.get("/v1/tasks").json()["data"]
    assert all(t["request_schema"]["required"] == ["input"] for t in listing)
    # a body written from request_schema is answered; the fields at the top level: one clear 400
    r = http.post("/v1/tasks/shopbench_task2", json={"model": "tiny", "input": MC})
    assert r.status_code == 200, r.text
    r = http.post("/v1/tasks/shopbench_task2", json={"model": "tiny", **MC})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert 'the task\'s fields go under `input`: send {"model": ..., "input": {"options": ..., ' \
           '"question": ...}} (got options, question at the top level)' in msg, msg
    r = http.post("/v1/tasks/shopbench_task2", json={"model": "tiny", "input": {"options": ["a", "b"], "q": 1}})
    assert r.status_code == 400 and "under `input`)" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("name", ["task2", "TASK2", "shopbench_task2", "Shopbench_Task2"])
def test_shopbench_task_names_as_reports_print_them(http, name):
    info = http.get(f"/v1/tasks/{name}")
    assert info.status_code == 200 and info.json()["id"] == "shopbench_task2", info.text
    assert info.json()["aliases"] == ["task2"]
    r = http.post(f"/v1/tasks/{name}", json={"model": "tiny", "input": MC})
    assert r.status_code == 200 and r.json()["task"] == "shopbench_task2", r.text


@pytest.mark.parametrize("name,close", [("task99", "task9"), ("shopbench_tsak12", "shopbench_task12"),
                                        ("ecguide_nerr", "ecguide_ner"), ("zzzz", None)])
def test_unknown_task_is_404_with_close_names(http, name, close):
    for r in (http.get(f"/v1/tasks/{name}"), http.post(f"/v1/tasks/{name}", json={"input": MC})):
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["param"] == "task" and f"unknown task {name!r}" in err["message"]
        assert ("did you mean" in err["message"]) == (close is not None), err
        if close:
            assert close in err["message"].split("did you mean", 1)[1], err


def test_task_adapter_by_shopbench_name_routes_the_card(live):
    from shoptune.serve.handlers import ServeSettings, Tasks
    from shoptune.serve.protocol import TaskRequest

    tasks = Tasks(live.engine, ServeSettings(task_adapters={"task2": "good"}))
    assert tasks.get("shopbench_task2").adapter == "good"
    caller = SimpleNamespace(state=SimpleNamespace())

    async def connected():
        return False
    caller.is_disconnected = connected
    out = asyncio.run(tasks.run("task2", TaskRequest(input=MC), caller))
    assert out.model == "good" and caller.state.model == "good"
