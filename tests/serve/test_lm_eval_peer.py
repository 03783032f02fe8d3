"""A real peer client: lm-evaluation-harness scoring `shoptune serve` through /v1/completions.

lm-eval's `local-completions` model (loglikelihood via echo + logprobs, generate_until via plain
completions with stop strings) against a float32 server with a LoRA adapter, on two small local
tasks (a task YAML over a JSON-lines file, no hub); its per-question results and scores must
equal lm-eval's own `hf` backend on the same model and adapter.
"""
import json

import pytest

pytest.importorskip("lm_eval")

from shoptune.serve.testing import ServerProcess as Server  # noqa: E402

from tests.serve.conftest import KEY  # noqa: E402

pytestmark = pytest.mark.slow

MC = [("Which product is a running shoe?", ["Nike Pegasus", "Le Creuset pot", "Kindle"], 0),
      ("Which item keeps drinks cold?", ["a desk lamp", "an insulated cooler", "a yoga mat"], 1),
      ("Which one is a kitchen appliance?", ["a blender", "a tent", "a scarf"], 0),
      ("What do you wear on your feet?", ["a hat", "gloves", "socks"], 2),
      ("Which product is for camping?", ["a sleeping bag", "a toaster", "a tie"], 0)]
GEN = [("Q: What color is a ripe banana?\nA:", "yellow"),
       ("Q: How many wheels does a bicycle have?\nA:", "two"),
       ("Q: What do you use to write on paper?\nA:", "a pen")]


def _tasks(root):
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n"
                                           for q, c, g in MC))
    (root / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GEN))
    (root / "shop_mc.yaml").write_text(f"""task: shop_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {root / 'mc.jsonl'}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
""")
    (root / "shop_gen.yaml").write_text(f"""task: shop_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {root / 'gen.jsonl'}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 12
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
""")
    return root


def _run(model, model_args, include):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    out = simple_evaluate(model=model, model_args=model_args, tasks=["shop_mc", "shop_gen"],
                          task_manager=TaskManager(include_path=str(include)), log_samples=True,
                          batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)
    samples = {t: sorted(s, key=lambda x: x["doc_id"]) for t, s in out["samples"].items()}
    return out["results"], samples


def test_lm_eval_local_completions_equals_its_hf_backend(adapters, tmp_path, monkeypatch):
    from shoptune.models import resolve
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    include = _tasks(tmp_path)
    path = str(resolve("smollm2-135m"))
    hf_res, hf_samples = _run("hf", {"pretrained": path, "peft": str(adapters["alpha"]),
                                     "dtype": "float32", "device": "cpu"}, include)
    server = Server(["--adapter", f"alpha={adapters['alpha']}", "--api-key", KEY, "--dtype", "float32"],
                    tmp_path / "server.log")
    try:
        api_res, api_samples = _run("local-completions", {
            "model": "alpha", "base_url": server.url + "/v1/completions", "tokenizer": path,
            "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1,
            "max_length": 2048}, include)
    finally:
        server.stop()
    assert "Traceback" not in (tmp_path / "server.log").read_text()
    # every loglikelihood lm-eval asked for, and every generation, per question
    for h, a in zip(hf_samples["shop_mc"], api_samples["shop_mc"]):
        ll_h = [r[0][0] for r in h["resps"]]
        ll_a = [r[0][0] for r in a["resps"]]
        assert ll_a == pytest.approx(ll_h, abs=1e-3), h["doc"]
    assert [s["resps"] for s in api_samples["shop_gen"]] == [s["resps"] for s in hf_samples["shop_gen"]]
    assert any(s["resps"][0][0].strip() for s in api_samples["shop_gen"])  # it really generated
    for task, metric in (("shop_mc", "acc,none"), ("shop_gen", "exact_match,none")):
        assert api_res[task][metric] == pytest.approx(hf_res[task][metric], abs=1e-3)
