"""What OpenAI clients that score text need: logprobs, echo, max_tokens 0, seed.

A float32 `shoptune serve` subprocess, the official openai client, and a direct forward pass of
the same model/adapter in this process as the reference (float32: the values agree to ~1e-5).
"""
import httpx
import pytest
import torch

from shoptune.serve.testing import ServerProcess as Server

from tests.conftest import DEV, needs_shared
from tests.serve.conftest import KEY

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}
http = httpx.Client(timeout=120)
PROMPT = "The best running shoe for a marathon is"


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-fp32") / "server.log"
    s = Server(["--adapter", f"alpha={adapters['alpha']}", "--api-key", KEY, "--dtype", "float32",
                "--max-wait-ms", "50"], log)
    yield s
    s.stop()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def ref(adapters):
    """(model, tok) in float32 with adapter "alpha"; ``log_probs(adapter, ids)`` = the direct pass."""
    from peft import PeftModel

    from shoptune.models import load

    model, tok = load("smollm2-135m", dtype="float32")
    pm = PeftModel.from_pretrained(model, str(adapters["alpha"]), adapter_name="alpha").eval()

    @torch.inference_mode()
    def log_probs(adapter, ids):
        """log p(token i | tokens < i) for i >= 1, and the full distributions."""
        if adapter is None:
            with pm.disable_adapter():
                logits = pm(torch.tensor([ids])).logits[0]
        else:
            pm.set_adapter(adapter)
            logits = pm(torch.tensor([ids])).logits[0]
        dist = torch.log_softmax(logits.float(), -1)
        return [dist[i - 1, t].item() for i, t in enumerate(ids) if i], dist
    return pm, tok, log_probs


@pytest.mark.parametrize("model,adapter", [("smollm2-135m", None), ("alpha", "alpha")])
def test_echo_with_max_tokens_0_gives_prompt_logprobs_of_a_direct_pass(client, ref, model, adapter):
    _, tok, log_probs = ref
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3,
                                  temperature=0)
    c = r.choices[0]
    ids = tok.encode(PROMPT)
    assert c.text == PROMPT and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.tokens == [tok.decode([t]) for t in ids] and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want, dist = log_probs(adapter, ids)
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:]):
        values, best = dist[i].topk(3)
        assert len(top) in (3, 4)  # the top 3, plus the prompt's own token when not among them
        assert max(top.values()) == pytest.approx(values[0].item(), abs=1e-4)
        assert top[tok.decode([best[0].item()])] == pytest.approx(values[0].item(), abs=1e-4)
    assert lp.text_offset == [len(tok.decode(ids[:k])) for k in range(len(ids))]


def test_generated_token_logprobs_equal_a_direct_pass_and_greedy_picks_the_top(client, ref):
    _, tok, log_probs = ref
    r = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, logprobs=2, temperature=0)
    c = r.choices[0]
    ids = tok.encode(PROMPT)
    gen = tok.encode(c.text, add_special_tokens=False)
    assert "".join(c.logprobs.tokens) == c.text and len(c.logprobs.tokens) == r.usage.completion_tokens
    want, _ = log_probs("alpha", ids + gen)
    assert c.logprobs.token_logprobs == pytest.approx(want[len(ids) - 1:], abs=1e-3)
    for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert lp == max(top.values())  # greedy: the chosen token is the best, the same number
    assert c.logprobs.text_offset[0] == 0


def test_the_lm_eval_loglikelihood_payload(server, ref):
    """Token-id prompts, echo, max_tokens 1, logprobs 1: the prompt's logprobs then one token."""
    _, tok, log_probs = ref
    prompts = [tok.encode(PROMPT + " comfortable"), tok.encode("Customers who buy a tent also buy")]
    r = http.post(server.url + "/v1/completions", headers=AUTH, json={
        "model": "alpha", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
        "seed": 1234, "echo": True}).json()
    for ids, choice in zip(prompts, sorted(r["choices"], key=lambda c: c["index"])):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(ids) + 1 and lps[0] is None
        assert lps[1:len(ids)] == pytest.approx(log_probs("alpha", ids)[0], abs=1e-4)
        assert choice["text"].startswith(tok.decode(ids))


def test_echo_without_logprobs_and_stop_cut_logprobs(client):
    r = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=4, echo=True,
                                  temperature=0)
    plain = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text and r.choices[0].logprobs is None
    full = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=12,
                                     temperature=0, logprobs=0).choices[0]
    word = full.text.split()[2]
    cut = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=12, temperature=0,
                                    logprobs=0, stop=[word]).choices[0]
    assert cut.text == full.text[:full.text.index(word)]
    k = len(cut.logprobs.tokens)  # only the tokens whose text was kept
    assert 0 < k < len(full.logprobs.tokens) and cut.logprobs.token_logprobs == full.logprobs.token_logprobs[:k]
    assert all(top == {} for top in full.logprobs.top_logprobs)  # logprobs 0: no alternatives


def test_chat_logprobs_and_top_logprobs(client, ref):
    _, tok, log_probs = ref
    msgs = [{"role": "user", "content": "Name one fruit."}]
    r = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob
        assert bytes(e.bytes).decode() == e.token
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    gen = tok.encode(r.choices[0].message.content, add_special_tokens=False)
    want, _ = log_probs("alpha", ids + gen)
    assert [e.logprob for e in content] == pytest.approx(want[len(ids) - 1:], abs=1e-3)


def test_seed_makes_sampling_reproducible_whatever_the_batch(client):
    def ask(seed, n=1):
        return [c.text for c in client.completions.create(
            model="alpha", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed, n=n).choices]
    alone = ask(7)
    # the same request again, now sharing batches with other sampled rows (n=3: seeds 7, 8, 9)
    together = ask(7, n=3)
    assert together[0] == alone[0] and ask(7) == alone
    assert len(set(together)) > 1  # the n choices use different seeds: they differ
    chat = [client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=12, temperature=1.0, seed=3).choices[0].message.content
            for _ in range(2)]
    assert chat[0] == chat[1]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": 1, "stream": True}, "logprobs"),
    ({"prompt": "hi", "max_tokens": 0, "stream": True, "echo": True}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
])
def test_bad_logprobs_requests_are_400_naming_the_field(server, body, param):
    r = http.post(server.url + "/v1/completions", json={"model": "alpha", **body}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_chat_top_logprobs_needs_logprobs(server):
    r = http.post(server.url + "/v1/chat/completions", headers=AUTH, json={
        "model": "alpha", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


@needs_shared
def test_plain_completions_give_the_evaluators_answers(client, ref):
    """A development question sent as a plain /v1/completions request (the evaluation prompt,
    greedy, the plan's token limit) gives `shoptune eval`'s answer once `finish` is applied, for
    the unconstrained task types (generation, NER); the constrained ones go through the task
    endpoint (tests/serve/test_server.py)."""
    from shoptune.data.loaders import load_records
    from shoptune.decoding import build_prompts
    from shoptune.tasks import finish, plan_for
    from shoptune.eval.backends import LocalBackend

    pm, tok, _ = ref
    pm.set_adapter("alpha")
    picked, seen = [], {}
    for r in load_records(DEV):
        if r.task_type in ("generation", "named_entity_recognition") and seen.get(r.metric, 0) < 1:
            seen[r.metric] = seen.get(r.metric, 0) + 1
            picked.append(r)
    prompts, plans = build_prompts(picked, "starter-kit"), [plan_for(r) for r in picked]
    want = LocalBackend(pm, tok, batch_size=1).run(prompts, plans)
    for prompt, plan, expected in zip(prompts, plans, want):
        r = client.completions.create(model="alpha", prompt=prompt, max_tokens=plan.max_new_tokens,
                                      temperature=0)
        assert finish(r.choices[0].text, plan) == expected
    assert len(picked) >= 3 and any(w.strip() for w in want)
