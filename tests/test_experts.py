"""Poly experts exported as plain LoRA are exact; adapters merged with peft's methods."""
import json
import os
import stat

import pytest
import torch

from shoptune.experts import ExpertError, export_experts, merge_adapters


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from shoptune.serve.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-base"))


def _poly(base_dir, out, *, n_tasks=3, n_skills=2, n_splits=2, seed=0):
    from peft import PolyConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = get_peft_model(m, PolyConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], n_tasks=n_tasks,
                                      n_skills=n_skills, n_splits=n_splits, task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero and the router near uniform: make both matter
        for n, p in pm.named_parameters():
            if "poly_lora_B" in n:
                p.normal_(0, 0.5)
            elif "module_logits" in n:
                p.normal_(0, 2.0)
    pm.save_pretrained(out)
    return pm.eval()


@pytest.mark.parametrize("n_splits", [1, 2])
def test_exported_experts_equal_poly_routed_by_task(tiny_base, tmp_path, n_splits):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    pm = _poly(tiny_base, tmp_path / "poly", n_splits=n_splits)
    experts = export_experts(tmp_path / "poly", tmp_path / "experts", {f"t{t}": [t] for t in range(3)})
    ids = torch.tensor([[5, 17, 301, 12, 9, 44]])
    outs = []
    for t in range(3):
        with torch.no_grad():
            want = pm(input_ids=ids, task_ids=torch.tensor([t])).logits
            base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
            lora = PeftModel.from_pretrained(base, str(experts[f"t{t}"])).eval()
            got = lora(input_ids=ids).logits
        assert json.loads((experts[f"t{t}"] / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert (got - want).abs().max() < 1e-4
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # routing by task changes the output
    meta = json.loads((tmp_path / "experts" / "experts.json").read_text())
    assert meta["routes"] == {"t0": [0], "t1": [1], "t2": [2]}


def _umask() -> int:
    cur = os.umask(0)
    os.umask(cur)
    return cur


def test_a_group_expert_and_bad_routes(tiny_base, tmp_path):
    _poly(tiny_base, tmp_path / "poly")
    old = os.umask(0o022)
    try:
        out = export_experts(tmp_path / "poly", tmp_path / "experts", {"g": [0, 2], "t0": [0]})
    finally:
        os.umask(old)
    assert set(out) == {"g", "t0"}
    # readable by colleagues on a shared machine, as any output (not tempfile's 0700; #24 item 12)
    assert stat.S_IMODE(out["g"].stat().st_mode) == 0o755
    with pytest.raises(ExpertError, match="task ids"):
        export_experts(tmp_path / "poly", tmp_path / "x", {"bad": [7]})
    with pytest.raises(ExpertError, match="expert name"):
        export_experts(tmp_path / "poly", tmp_path / "x", {"../evil": [0]})
    with pytest.raises(ExpertError, match="POLY"):
        export_experts(out["t0"], tmp_path / "x", {"a": [0]})


def test_merge_cat_is_the_exact_sum_and_ties_gives_one_lora(tiny_base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    folders = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
        pm.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    ids = torch.tensor([[5, 17, 301, 12]])

    def logits(folder=None):
        m = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        if folder is None:
            return m(input_ids=ids).logits
        return PeftModel.from_pretrained(m, str(folder)).eval()(input_ids=ids).logits
    with torch.no_grad():
        base, la, lb = logits(), logits(folders["a"]), logits(folders["b"])
        cat = merge_adapters(folders, tmp_path / "cat", model=str(tiny_base), method="cat")
        both = logits(cat)
        # cat keeps every delta: on a linear layer the sum of both updates (checked per layer)
        from safetensors.torch import load_file
        wa, wb, wc = (load_file(f / "adapter_model.safetensors") for f in (folders["a"], folders["b"], cat))
        k = next(k for k in wa if "q_proj.lora_A" in k)
        kb = k.replace("lora_A", "lora_B")
        delta = lambda w, s: s * (w[kb] @ w[k])  # noqa: E731
        cfg = json.loads((cat / "adapter_config.json").read_text())
        s_cat = cfg["lora_alpha"] / cfg["r"]
        assert torch.allclose(delta(wc, s_cat), delta(wa, 2.0) + delta(wb, 2.0), atol=1e-5)
        ties = merge_adapters(folders, tmp_path / "ties", model=str(tiny_base), method="ties", density=0.5)
        lt = logits(ties)
    assert json.loads((ties / "merge.json").read_text())["method"] == "ties"
    assert stat.S_IMODE(ties.stat().st_mode) == 0o777 & ~_umask()  # (#24 item 12: not 0700)
    assert (lt - base).abs().max() > 1e-4 and (both - la).abs().max() > 1e-4
    with pytest.raises(ExpertError, match="two"):
        merge_adapters({"a": folders["a"]}, tmp_path / "one", model=str(tiny_base))


def test_run_experts_fallback_for_capabilities_never_trained(tiny_base, tmp_path):
    """A Poly run on one capability: other capabilities' cards have no expert. By default they
    are listed as unrouted (the base model answers them); --fallback mean exports an all-tasks
    expert, exactly the group of every route, and routes them to it."""
    from typer.testing import CliRunner

    from shoptune.cli import app
    from shoptune.experts import ALL_TASKS, export_run_experts
    from shoptune.tasks import all_cards
    cards = all_cards()
    trained = {"concept_understanding", "user_behavior_alignment"}  # two of the four capabilities
    tasks = ([n for n, c in cards.items() if c.capability == "concept_understanding"][:2]
             + [n for n, c in cards.items() if c.capability == "user_behavior_alignment"][:1])
    run = tmp_path / "run"
    _poly(tiny_base, run / "adapter")
    routing = {"route_by": "task", "routes": tasks, "task_route": {t: i for i, t in enumerate(tasks)},
               "task_capability": {t: cards[t].capability for t in tasks}}
    (run / "adapter" / "routing.json").write_text(json.dumps(routing))
    others = sorted(n for n, c in cards.items() if c.capability not in trained)

    meta = export_run_experts(run, tmp_path / "plain")
    assert meta["fallback"] == "capability" and meta["unrouted"] == others
    assert set(meta["task_experts"]) == {n for n in cards if n not in others}
    assert ALL_TASKS not in meta["experts"]

    r = CliRunner().invoke(app, ["export", "experts", str(run), "--out", str(tmp_path / "mean"), "--fallback", "mean"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "mean" / "experts.json").read_text())
    assert meta["unrouted"] == [] and set(meta["task_experts"]) == set(cards)
    assert {meta["task_experts"][n] for n in others} == {ALL_TASKS}
    assert meta["task_experts"][tasks[0]] == tasks[0]
    assert {meta["task_experts"][n] for n, c in cards.items() if c.capability in trained and n not in tasks} == trained
    assert meta["routes"][ALL_TASKS] == [0, 1, 2]
    # the all-tasks expert is the mean-routing group of every task, weight for weight, and not
    # either capability's expert
    from safetensors.torch import load_file
    group = export_experts(run / "adapter", tmp_path / "group", {"g": [0, 1, 2]})["g"]
    a = load_file(group / "adapter_model.safetensors")
    b = load_file(tmp_path / "mean" / ALL_TASKS / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for cap in trained:
        c = load_file(tmp_path / "mean" / cap / "adapter_model.safetensors")
        assert any((c[k] - b[k]).abs().max() > 1e-4 for k in b)

    r = CliRunner().invoke(app, ["export", "experts", str(run), "--out", str(tmp_path / "x"), "--fallback", "nearest"])
    # (#34: --fallback lists its choices, so a wrong one is a usage error naming them)
    said = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "'nearest' is not one of 'capability', 'mean'" in said, said
    assert not (tmp_path / "x").exists()
