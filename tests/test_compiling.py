"""``compile: auto|on|off`` (#35): what the setting resolves to, and that compiled decoder layers
change nothing but speed on a tiny model: training steps (LoRA with dropout, Poly) give eager's
losses and gradients, a compiled run killed with SIGKILL resumes bit-identically, the three-stage
curriculum runs, evaluation answers equal eager's in fp32 (generation's KV-cache steps and the
prefix cache included), and the server's per-row adapters still batch.

The compile tests are slow (inductor builds C++ kernels: tens of seconds cold on 2 cores, a few
seconds warm from the cache folder)."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from shoptune import compiling
from shoptune.compiling import CompileUnavailable, resolve
from shoptune.train.config import load_config
from tests.conftest import REPO, needs_shared


# ----------------------------------------------------------------------------- the setting

def test_off_on_and_auto(monkeypatch):
    assert resolve("off", "train") is False and resolve(False, "eval") is False
    assert resolve("on", "train") is True and resolve(True, "serve") is True
    monkeypatch.setattr(compiling, "machine_kind", lambda: "avx512_bf16")
    monkeypatch.setattr(compiling, "MEASURED", {"train": {"avx512_bf16": True}, "eval": {"amx": True}})
    assert resolve("auto", "train") is True
    assert resolve("auto", "eval") is False and resolve("auto", "serve") is False  # measured elsewhere only
    with pytest.raises(ValueError, match="compile 'sometimes': one of auto, on, off"):
        resolve("sometimes", "train")


def test_no_compiler_refuses_on_and_leaves_auto_off(monkeypatch):
    from torch._inductor import config
    monkeypatch.setattr(compiling, "MEASURED", {"train": {compiling.machine_kind(): True}})
    with config.patch({"cpp.cxx": ("no-such-c++",)}):  # (inductor's own override: restored on exit)
        with pytest.raises(CompileUnavailable, match=r"^compile: on: no C\+\+ compiler \(no-such-c\+\+ not on PATH\)"):
            resolve("on", "train")
        assert resolve("auto", "train") is False


def test_config_reads_yaml_on_off_and_refuses_what_cannot_compile(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("compile: on\n")  # (YAML 1.1 reads on/off as booleans)
    assert load_config(cfg).compile == "on"
    assert load_config(None, ["compile=off"]).compile == "off"
    assert load_config(None).compile == "auto"
    assert load_config(None, ["torch_compile=true"]).compile == "on"  # the former name
    for overrides, says in ((["compile=on", "packing=true"], "compile: on with packing: true"),
                            (["compile=on", "quantization=nf4"], "compile: on with quantization: nf4"),
                            (["torch_compile=true", "compile=off"], "contradicts compile: off")):
        with pytest.raises(ValueError, match=says):
            load_config(None, overrides)
    from shoptune.train.trainer import use_compile
    assert use_compile(load_config(None, ["compile=off"])) is False
    assert use_compile(load_config(None, ["packing=true"])) is False  # auto: packed runs stay eager


def test_caches_live_under_the_project_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compiling.inductor_settings() == tmp_path / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # set by the user: kept
    assert compiling.inductor_settings() == tmp_path / "mine"
    # importing torch._dynamo (transformers does) writes torch's /tmp default into the environment
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    assert not cache_dir().startswith(str(tmp_path))
    assert compiling.inductor_settings() == tmp_path / "inductor"
    assert cache_dir() == str(tmp_path / "inductor")  # where inductor writes


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from shoptune.serve.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-compile"))


def _steps(model_dir, peft: str, compile: bool, bf16: bool = False) -> tuple[list[float], dict]:
    """Three training steps of different lengths; the losses and the trained weights.
    ``bf16``: frozen weights in bf16 and bf16 autocast, as training runs on a bf16 machine."""
    from shoptune.train.config import LoraSettings, PolySettings
    from shoptune.train.loss import answer_token_losses
    from shoptune.train.trainer import build_model
    torch.manual_seed(0)
    model, _ = build_model(str(model_dir), LoraSettings(r=4, dropout=0.1 if peft == "lora" else 0.0),
                           peft=peft, poly=PolySettings(n_skills=2), n_routes=3, compile=compile,
                           base_dtype=torch.bfloat16 if bf16 else torch.float32)
    with torch.no_grad():  # B starts at 0: make the adapter matter from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for length in (12, 17, 9):
        ids = torch.randint(5, 4000, (3, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length - 3:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :length // 2] = -100
        route = {"route_ids": torch.tensor([0, 2, 1])} if peft == "poly" else {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tok_loss, _ = answer_token_losses(model, ids, mask, labels, **route)
        loss = tok_loss.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k}


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "poly"])
def test_a_compiled_step_trains_like_the_eager_one(tiny_model, peft):
    """Same losses and weights within fp32 rounding over steps of three lengths (LoRA with
    dropout and Poly's relaxed-Bernoulli routing draw the same random numbers compiled), and the
    same parameter names (checkpoints and adapters are unchanged)."""
    eager, w_eager = _steps(tiny_model, peft, compile=False)
    compiled, w_compiled = _steps(tiny_model, peft, compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert w_compiled.keys() == w_eager.keys() and w_eager
    for k in w_eager:
        assert torch.allclose(w_compiled[k], w_eager[k], atol=1e-4), k


@pytest.mark.slow
def test_a_compiled_bf16_step_rounds_like_the_eager_one(tiny_model):
    """Under bf16 autocast a fused kernel rounds its intermediates to bf16 where eager's separate
    ops do (inductor's emulate_precision_casts): the losses are eager's to fp32 rounding, where
    fused kernels that keep intermediates in fp32 move them by up to 2e-3 on this model."""
    eager, _ = _steps(tiny_model, "lora", compile=False, bf16=True)
    compiled, _ = _steps(tiny_model, "lora", compile=True, bf16=True)
    assert compiled == pytest.approx(eager, rel=1e-6, abs=1e-6)


TINY_RUN = ["mixture.total=24", "mixture.include_tasks=[ecguide_sa,ecguide_spa,ecguide_qprp,ecguide_ner]",
            "batch_size=4", "max_length=96", "logging_steps=1", "report_to=[]", "learning_rate=0.002",
            "warmup_ratio=0.0", "lora.r=4", "compile=on"]


@pytest.mark.slow
@needs_shared
def test_a_compiled_run_killed_with_sigkill_resumes_bit_identically(tiny_model, tmp_path):
    def run(out, *extra):
        cmd = [sys.executable, "-m", "shoptune.train.recipe", str(REPO / "configs/train/smoke.yaml"),
               *TINY_RUN, f"model={tiny_model}", f"output_dir={out}", "max_steps=16", "save_steps=2",
               "save_total_limit=3", *extra]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ref = run(tmp_path / "ref")
    assert ref.wait(timeout=900) == 0, ref.stderr.read()[-3000:]
    assert json.loads((tmp_path / "ref" / "run.json").read_text())["compiled"] is True
    victim = run(tmp_path / "cut")
    deadline = time.time() + 900
    while not (tmp_path / "cut" / "checkpoint-4" / "COMPLETE").exists():
        assert victim.poll() is None and time.time() < deadline, "run ended before checkpoint-4"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "cut" / "adapter").exists(), "killed too late to test a resume"
    resumed = run(tmp_path / "cut", "--resume")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-3000:]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()
               if '"loss"' in x] for d in ("ref", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 16


@pytest.mark.slow
@needs_shared
def test_the_three_stage_curriculum_runs_compiled(tiny_model, tmp_path):
    from shoptune.train.recipe import main
    extra = ["curriculum=three-stage", "max_steps=2", "mixture.total=null", "mixture.max_per_task=8",
             "mixture.per_task_caps={ecguide_ner: 3}", "three_stage.low_resource_rows=5",
             "three_stage.probe_batches=1", "three_stage.min_transfer=-1.0", "three_stage.eval_every=1",
             "three_stage.val_rows_per_task=4"]
    res = main(load_config(REPO / "configs/train/smoke.yaml",
                           TINY_RUN + extra + [f"model={tiny_model}", f"output_dir={tmp_path}"]))
    rep = json.loads((tmp_path / "curriculum.json").read_text())
    assert res["compiled"] is True and res["metrics"]["steps"] == 2
    assert rep["low_resource"] == ["ecguide_ner"] and "ecguide_ner" in rep["stage3_tasks"]
    assert len(rep["val_loss_history"]) == 1 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- inference

@pytest.mark.slow
@needs_shared
def test_compiled_evaluation_gives_eager_answers_in_fp32(tiny_model):
    """Multiple choice (one forward), generation (prefill and KV-cache steps, batches of
    different sizes and lengths) and the prefix cache, through compiled layers."""
    from shoptune.decoding import build_prompts
    from shoptune.tasks import plan_for
    from shoptune.eval.backends import LocalBackend
    from shoptune.eval.suite import build_suite
    from shoptune.models import load
    recs, _ = build_suite("tiny")
    recs = [r for r in recs if plan_for(r).kind == "choice"][:3] + [r for r in recs if plan_for(r).kind != "choice"][:5]
    prompts, plans = build_prompts(recs, "starter-kit"), [plan_for(r) for r in recs]
    answers = {}
    for compile, prefix in ((False, False), (True, False), (True, True)):
        model, tok = load(str(tiny_model), dtype="fp32")
        answers[compile, prefix] = LocalBackend(model, tok, batch_size=3, prefix_cache=prefix,
                                                compile=compile).run(prompts, plans)
    assert compiling.is_compiled(model)
    assert answers[True, False] == answers[False, False] == answers[True, True]


@pytest.mark.slow
def test_the_compiled_engine_batches_per_row_adapters(tmp_path):
    """Rows for the base model and two adapters in one batch: the compiled engine answers what
    the eager one does (peft's per-row batches run eagerly; the base model compiled)."""
    from shoptune.models import load
    from shoptune.serve.engine import Engine
    from shoptune.serve.testing import make_tiny_fixtures
    fx = make_tiny_fixtures(tmp_path / "fx")

    def answers(compile):
        model, tok = load(str(fx["base"]), dtype="fp32")
        engine = Engine(model, tok, base_name="tiny", max_wait=0.3, compile=compile)
        async def batch(*models):
            jobs = [engine.submit(_job(engine, m)) for m in models]
            return await asyncio.gather(*(engine.complete(j) for j in jobs))
        try:
            alone = asyncio.run(batch(None, None))  # the plain base model: compiled
            engine.load_adapter("good", fx["good"])
            engine.load_adapter("good2", fx["good2"])
            return [*alone, *asyncio.run(batch(None, "good", "good2", "good"))]
        finally:
            engine.stop()
    eager, compiled = answers(False), answers(True)
    assert compiled == eager and len(set(eager[2:5])) == 3  # the adapters do change the answer


def _job(engine, model):
    from shoptune.serve.engine import Job
    return Job(engine.tok.encode("The best running shoe is"), model, max_new_tokens=6)


@pytest.mark.slow
def test_prompts_run_compiled_and_decode_steps_eagerly(tiny_model):
    """A forward of several tokens per row compiles; one of one token per row (a decode step)
    runs the layers eagerly: no graph is compiled for it. The compiler's stance is back to
    default after each forward, also after one that raised."""
    from torch._dynamo import eval_frame
    from torch._dynamo.utils import counters

    from shoptune.models import load
    torch.compiler.reset()  # (graphs compiled by the tests before are reused otherwise)
    model, _ = load(str(tiny_model), dtype="fp32")
    compiling.compile_layers(model, inference=True)
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    stance = lambda: eval_frame._stance.stance  # noqa: E731  (rebound by each set_stance)
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    before = graphs()
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        assert graphs() > before and stance() == "default"
        before = graphs()
        step = model(input_ids=ids[:, :1], past_key_values=out.past_key_values)
        assert graphs() == before and stance() == "default"
        assert step.logits.shape == (2, 1, model.config.vocab_size)
        with pytest.raises(IndexError):  # a token id past the vocabulary, in a decode step
            model(input_ids=torch.full((2, 1), model.config.vocab_size + 5))
        assert stance() == "default"
