"""The request handlers called directly (no HTTP, no subprocess): an in-process engine on the tiny
model, a stand-in for the HTTP request, and the response models they return."""
import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest

from shoptune.serve.engine import EngineError, UnknownModel
from shoptune.serve.handlers import (Admin, Chat, ClientGone, Completions, NotFound,
                                     ServeSettings, Serving, Tasks, Timeout)
from shoptune.serve.protocol import (AdapterStatus, ChatCompletionRequest, ChatCompletionResponse,
                                     CompletionRequest, CompletionResponse, LoadAdapterRequest,
                                     TaskRequest, TaskResult, UnloadAdapterRequest)

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)
PROMPT = "The best running shoe is"


class Caller:
    """What a handler reads of the HTTP request."""

    def __init__(self, gone: bool = False):
        self.state, self.gone, self.polls = SimpleNamespace(), gone, 0

    async def is_disconnected(self) -> bool:
        self.polls += 1
        return self.gone


@pytest.fixture(scope="module")
def served(tiny):
    from shoptune.models import load
    from shoptune.serve.engine import Engine

    model, tok = load(str(tiny["base"]), dtype="fp32")
    engine = Engine(model, tok, base_name="tiny", max_queue=8, max_wait=0.02)
    engine.load_adapter("good", tiny["good"])
    settings = ServeSettings(adapters_dir=tiny["good"].parent, max_new_tokens=64)
    yield SimpleNamespace(engine=engine, settings=settings, tok=tok,
                          completions=Completions(engine, settings), chat=Chat(engine, settings),
                          tasks=Tasks(engine, settings), admin=Admin(engine, settings))
    engine.stop()


@pytest.fixture(scope="module")
def reference(tiny):
    """Plain peft on the same weights: what a greedy answer must equal."""
    from peft import PeftModel

    from shoptune.models import load
    model, tok = load(str(tiny["base"]), dtype="fp32")
    return PeftModel.from_pretrained(model, str(tiny["good"]), adapter_name="good"), tok


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("model", ["tiny", "good"])
def test_completion_equals_plain_peft_and_labels_the_resolved_model(served, reference, model):
    from shoptune.serve.testing import greedy_reference
    caller = Caller()
    out = run(served.completions.create(
        CompletionRequest(model=model, prompt=PROMPT, max_tokens=8, temperature=0), caller))
    assert isinstance(out, CompletionResponse)
    pm, tok = reference
    assert out.choices[0].text == greedy_reference(pm, tok, None if model == "tiny" else model, PROMPT, 8)
    assert out.choices[0].finish_reason == "length" and out.choices[0].logprobs is None
    n_prompt = len(tok(PROMPT)["input_ids"])
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)
    assert caller.state.model == model  # the metrics label is the resolved name


def test_echo_with_max_tokens_zero_scores_the_prompt_only(served):
    req = CompletionRequest(model="good", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    out = run(served.completions.create(req, Caller()))
    (choice,) = out.choices
    lp = choice.logprobs
    n_prompt = len(served.tok(PROMPT)["input_ids"])
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    assert len(lp.tokens) == n_prompt and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) in (2, 3) and top[token] == logprob  # the top 2, plus the prompt's own token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_reply_and_its_stream_say_the_same(served):
    req = dict(model="good", messages=[{"role": "user", "content": "Name a shoe."}], max_tokens=6, temperature=0)
    whole = run(served.chat.create(ChatCompletionRequest(**req), Caller()))
    assert isinstance(whole, ChatCompletionResponse) and whole.choices[0].message.role == "assistant"

    async def stream():
        resp = await served.chat.create(ChatCompletionRequest(**req, stream=True,
                                                              stream_options={"include_usage": True}), Caller())
        return [c if isinstance(c, str) else c.decode() async for c in resp.body_iterator]
    events = [e.removeprefix("data: ").strip() for e in run(stream())]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        whole.choices[0].message.content
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["delta"] == {} and "usage" not in finish[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump()


class Stuck:
    """An engine whose jobs never finish."""
    tok = None

    async def complete(self, job):
        await asyncio.Event().wait()


def test_waiting_stops_the_jobs_when_the_client_leaves_or_time_runs_out():
    jobs = [SimpleNamespace(cancelled=threading.Event()) for _ in range(3)]
    caller = Caller(gone=True)
    with pytest.raises(ClientGone):
        run(Serving(Stuck(), ServeSettings()).wait_all(caller, jobs))
    assert caller.polls == 1 and all(j.cancelled.is_set() for j in jobs)

    jobs = [SimpleNamespace(cancelled=threading.Event()) for _ in range(2)]
    t0 = time.monotonic()
    with pytest.raises(Timeout) as e:
        run(Serving(Stuck(), ServeSettings(request_timeout=0.3)).wait_all(Caller(), jobs))
    assert 0.3 <= time.monotonic() - t0 < 5 and e.value.status == 504
    assert all(j.cancelled.is_set() for j in jobs)


def test_bad_requests_raise_errors_naming_the_field(served):
    c = served.completions
    for req, param in ((dict(max_tokens=65), "max_tokens"),  # above --max-new-tokens 64
                       (dict(n=3, prompt=[PROMPT] * 3), "n"),  # 9 sequences > queue of 8
                       (dict(prompt=[[10**9]]), "prompt"),  # not a token id
                       (dict(presence_penalty=0.5), "presence_penalty"),
                       (dict(max_tokens=0, stream=True), "max_tokens")):
        with pytest.raises(EngineError) as e:
            run(c.create(CompletionRequest(**{"model": "tiny", "prompt": PROMPT, **req}), Caller()))
        assert e.value.param == param and e.value.status == 400, (req, e.value.message)
    with pytest.raises(UnknownModel):
        run(c.create(CompletionRequest(model="nope", prompt=PROMPT), Caller()))
    with pytest.raises(EngineError) as e:
        run(served.chat.create(ChatCompletionRequest(
            model="tiny", messages=[{"role": "user", "content": "x " * 3000}]), Caller()))
    assert e.value.param == "messages" and "2048" in e.value.message


def test_task_answers_are_parsed_and_bad_input_names_its_field(served):
    inp = {"question": "Which is a shoe?", "options": ["apple", "sneaker", "lamp"]}
    out = run(served.tasks.run("shopbench_task2", TaskRequest(model="good", input=inp), Caller()))
    assert isinstance(out, TaskResult) and out.task == "shopbench_task2" and out.model == "good"
    assert out.answer in (0, 1, 2) and out.answer_text == inp["options"][out.answer]
    assert "answer_items" not in out.model_dump()  # absent, not null: it is not a ranking task
    with pytest.raises(EngineError) as e:
        run(served.tasks.run("shopbench_task2", TaskRequest(input={"question": "q", "options": ["one"]}), Caller()))
    assert e.value.param == "input.options" and "question, options" in e.value.message
    with pytest.raises(NotFound):
        served.tasks.get("no_such_task")
    info = served.tasks.get("shopbench_task2")
    assert info.task_type == "multiple-choice" and "options" in info.input_schema["properties"]
    assert {t.id for t in served.tasks.list().data} >= {"shopbench_task2", "shopbench_task12"}


def test_admin_confines_adapters_to_their_folder_and_loads_and_unloads(served, tiny):
    admin = served.admin
    for name, path, param in (("x", "../outside", "lora_path"), ("x", "/etc", "lora_path"),
                              ("x", "a\x00b", "lora_path"), ("bad name", None, "lora_name")):
        with pytest.raises(EngineError) as e:
            run(admin.load_adapter(LoadAdapterRequest(lora_name=name, lora_path=path)))
        assert e.value.param == param, (name, path, e.value.message)
    with pytest.raises(EngineError) as e:
        Admin(served.engine, ServeSettings()).adapter_path("x", None)
    assert "--adapters-dir" in e.value.message
    got = run(admin.load_adapter(LoadAdapterRequest(lora_name="second", lora_path="good2")))
    assert isinstance(got, AdapterStatus) and "second" in got.models
    assert [m.id for m in admin.models().data] == served.engine.models()
    assert admin.models().data[0].parent is None and admin.models().data[-1].parent == "tiny"
    assert "second" not in run(admin.unload_adapter(UnloadAdapterRequest(lora_name="second"))).models
    h = admin.health("ready")
    assert h.status == "ok" and h.ready and h.live and h.adapters == ["good"]


def test_a_failed_load_names_the_folder_as_lora_path_does(served, tiny):
    """#34 item 11: a folder without adapter_config.json was answered with its absolute path and
    ``"param": null``; every load error names it relative to --adapters-dir, under lora_path."""
    from fastapi.testclient import TestClient

    from shoptune.serve.app import build_app
    root = tiny["good"].parent
    (root / "no-config").mkdir(exist_ok=True)
    for folder, starts in (("no-config", "lora_path 'no-config': no adapter_config.json"),
                           ("mismatch", "adapter mismatch was trained for a different base model")):
        with pytest.raises(EngineError) as e:
            run(served.admin.load_adapter(LoadAdapterRequest(lora_name="x", lora_path=folder)))
        assert e.value.param == "lora_path" and e.value.message.startswith(starts), e.value.message
        assert str(root) not in e.value.message and str(root.resolve()) not in e.value.message
    r = TestClient(build_app(served.engine, served.settings)).post(
        "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "no-config"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.json()
    assert r.json()["error"]["message"] == ("lora_path 'no-config': no adapter_config.json (not a PEFT "
                                            "adapter folder)")
    assert "x" not in served.engine.models()


def test_http_replies_keep_openai_keys_null_where_openai_sends_null(served):
    """Through the app (routes + response models), in process: the keys of each reply, with
    ``logprobs: null`` present and ``usage`` / empty ``delta`` keys absent where OpenAI omits them."""
    from fastapi.testclient import TestClient

    from shoptune.serve.app import build_app
    http = TestClient(build_app(served.engine, served.settings))  # no `with`: the engine outlives it
    r = http.post("/v1/completions", json={"model": "good", "prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and list(r.json()) == ["id", "object", "created", "model", "choices", "usage"]
    assert r.json()["choices"][0] == {"index": 0, "text": r.json()["choices"][0]["text"], "logprobs": None,
                                      "finish_reason": "length"}
    r = http.post("/v1/completions", json={"model": "good", "prompt": PROMPT, "max_tokens": 2, "stream": True})
    chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert all("usage" not in c and list(c["choices"][0]) == ["index", "text", "logprobs", "finish_reason"]
               for c in chunks)
    r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "stream": True,
                                                "messages": [{"role": "user", "content": "hi"}]})
    deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert deltas[0]["role"] == "assistant" and deltas[-1] == {} and r.text.endswith("data: [DONE]\n\n")
    r = http.post("/v1/tasks/shopbench_task4", json={"input": {"text": "asus zenbook sleeve", "entity_type": "brand"}})
    assert r.status_code == 200 and "answer" in r.json() and "answer_text" not in r.json(), r.json()
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["adapters"] == ["good"]
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 999})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_non_finite_logprobs_are_clamped_as_vllm_does():
    """A masked token's log-probability is -inf, which JSON cannot carry: it is written as
    -9999.0 (vLLM's floor), in both the completions and the chat shape; finite values and a
    prompt's leading None pass through unchanged."""
    from shoptune.serve.handlers import LOGPROB_FLOOR, chat_logprobs, completion_logprobs, finite

    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "".join(f"<{i}>" for i in ids))
    inf, nan = float("inf"), float("nan")
    comp = completion_logprobs(tok, [1, 2, 3], [None, -inf, -0.5], [None, [(2, -inf), (4, nan)], [(3, -0.5)]])
    assert comp.token_logprobs == [None, LOGPROB_FLOOR, -0.5]
    assert comp.top_logprobs == [None, {"<2>": LOGPROB_FLOOR, "<4>": LOGPROB_FLOOR}, {"<3>": -0.5}]
    chat = chat_logprobs(tok, [2, 3], [-inf, -1e5], [[(2, -inf)], [(3, -1e5)]], k=1)
    assert [c.logprob for c in chat.content] == [LOGPROB_FLOOR, LOGPROB_FLOOR]
    assert [c.top_logprobs[0].logprob for c in chat.content] == [LOGPROB_FLOOR, LOGPROB_FLOOR]
    assert finite(float("inf")) == 0.0 and finite(-0.0) == 0.0  # nothing above a log-probability's 0

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")
    for obj in (comp, chat):
        json.loads(obj.model_dump_json(), parse_constant=strict)


def test_an_abandoned_request_leaves_no_unretrieved_exception_in_the_log(caplog):
    """#31 item 27: a client that leaves (or a timeout) cancels the gathered jobs; asyncio must not
    log "_GatheringFuture exception was never retrieved" with a traceback for each such request."""
    import gc
    import logging
    for caller, settings in ((Caller(gone=True), ServeSettings()), (Caller(), ServeSettings(request_timeout=0.2))):
        jobs = [SimpleNamespace(cancelled=threading.Event()) for _ in range(2)]
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            with pytest.raises((ClientGone, Timeout)):
                run(Serving(Stuck(), settings).wait_all(caller, jobs))
            gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


def test_large_prompts_are_tokenised_off_the_event_loop(served):
    """#31 item 12: tokenising a ~1 MB prompt takes about a second; on the event loop it held up
    every other request (/health went from 39 ms to 4 s). Now: a prompt that cannot fit is refused
    without tokenising, and one that is tokenised leaves the loop free."""
    text = "word " * 200_000  # 1 MB, 200k tokens

    async def with_ticker(work):
        lag = []

        async def tick():
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lag.append(time.perf_counter() - t - 0.01)
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        out = await asyncio.gather(*work(), return_exceptions=True)
        ticker.cancel()
        return out, time.perf_counter() - t0, max(lag or [0.0])

    c = served.completions  # (--max-prompt-tokens 2048: 1 MB is at least ~6,000 tokens)
    out, took, lag = run(with_ticker(lambda: [c.create(CompletionRequest(model="tiny", prompt=text), Caller())
                                              for _ in range(8)]))
    assert all(isinstance(e, EngineError) and e.param == "prompt" and "prompt is at least" in e.message
               for e in out), out
    assert took < 1.0, took  # refused without tokenising 8 MB
    wide = Completions(served.engine, ServeSettings(max_prompt_tokens=10**6))
    out, took, lag = run(with_ticker(lambda: [wide.encode(text, special=True, param="prompt") for _ in range(3)]))
    assert [len(ids) for ids in out] == [len(served.tok.encode(text))] * 3
    assert lag < 0.25 < took, (lag, took)  # seconds of tokenising, the loop never held for long


def test_a_tasks_expert_unloaded_leaves_it_to_the_base_model(served):
    """#31 item 11: with `--task-adapter shopbench_task2=expert`, unloading (or reloading) the expert
    gave every call for the task a 404 "The model `expert` does not exist" although the client named
    no model, and /v1/tasks still listed it. Now the base model answers (as a task without an expert)
    and says so; a client that names the unloaded expert still hears 404."""
    tasks = Tasks(served.engine, ServeSettings(task_adapters={"shopbench_task2": "expert"}, max_new_tokens=64))
    inp = {"question": "Which is a shoe?", "options": ["apple", "sneaker", "lamp"]}
    served.engine.load_adapter("expert", served.settings.adapters_dir / "good2")
    try:
        assert tasks.get("shopbench_task2").adapter == "expert"
        assert run(tasks.run("shopbench_task2", TaskRequest(input=inp), Caller())).model == "expert"
    finally:
        run(served.engine.unload_adapter("expert"))
    assert tasks.get("shopbench_task2").adapter is None
    caller = Caller()
    out = run(tasks.run("shopbench_task2", TaskRequest(input=inp), caller))
    assert out.model == "tiny" and caller.state.model == "tiny" and out.answer in (0, 1, 2)
    with pytest.raises(UnknownModel):
        run(tasks.run("shopbench_task2", TaskRequest(model="expert", input=inp), Caller()))


def test_a_body_too_deep_or_with_a_huge_integer_says_why(served):
    """#31 item 28: both got the framework's "There was an error parsing the body"."""
    from fastapi.testclient import TestClient

    from shoptune.serve.app import build_app
    http = TestClient(build_app(served.engine, served.settings))
    for body, says in (('{"model": "tiny", "prompt": "x", "seed": ' + "7" * 5000 + "}", "more than 4300 digits"),
                       ('{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests arrays/objects too deeply")):
        r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
