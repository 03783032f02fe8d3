"""QLoRA (``quantization: nf4|int8``) on CPU with bitsandbytes' CPU library: the decoder's Linear
layers are k-bit and frozen, only LoRA trains, a real run learns, and the adapter it saves is a
plain LoRA that loads with peft on the unquantized base and helps there too."""
import json

import pytest
import torch

from shoptune.train.config import LoraSettings
from tests.conftest import needs_shared

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama saved as a local HF folder with the embedded model's tokenizer-free
    shapes (build_model only needs config + weights; the tokenizer comes from the same folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shoptune.models import load_tokenizer
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    load_tokenizer("smollm2-135m").save_pretrained(d)
    return d


@pytest.mark.parametrize("kind, layer, weight_dtype", [("nf4", "Linear4bit", torch.uint8),
                                                        ("int8", "Linear8bitLt", torch.int8)])
def test_quantized_layers_present_and_frozen_only_lora_trains(tiny_llama, kind, layer, weight_dtype):
    from shoptune.train.quant import quantized_layers
    from shoptune.train.trainer import build_model
    model, _ = build_model(str(tiny_llama), LoraSettings(r=4), quantization=kind, gradient_checkpointing=True)
    q = quantized_layers(model)
    assert len(q) == 2 * 7 and {type(m).__name__ for _, m in q} == {layer}  # every decoder Linear
    assert all(m.weight.dtype == weight_dtype and not m.weight.requires_grad for _, m in q)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2
    assert model.get_base_model().is_gradient_checkpointing
    # a step changes the LoRA weights and nothing else
    before = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    ids = torch.randint(3, 1000, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach().float(), before[n])}
    assert changed and all("lora_B" in n for n in changed)  # B moves first (A's grad is 0 while B == 0)


@pytest.mark.slow
@needs_shared
def test_qlora_run_on_the_embedded_model_learns_and_adapter_loads_unquantized(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shoptune.models import load_tokenizer, resolve
    from shoptune.train.format import encode_records
    from shoptune.train.loss import mean_answer_loss
    from shoptune.train.mixture import MixtureConfig, build_mixture
    from shoptune.train.recipe import main
    from tests.train.test_recipe import tiny

    out = tmp_path / "qlora"
    main(tiny(out, "max_steps=6", "quantization=nf4", "gradient_checkpointing=true", "bf16=false"))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "quant" not in json.dumps(cfg).lower()
    # plain peft, unquantized fp32 base: the adapter applies and lowers the loss on the rows it saw
    base = AutoModelForCausalLM.from_pretrained(str(resolve("smollm2-135m")), dtype=torch.float32).eval()
    run = json.loads((out / "run.json").read_text())
    records, _ = build_mixture(MixtureConfig(**run["config"]["mixture"]))
    tok = load_tokenizer("smollm2-135m")
    ex = encode_records(records[:8], tok, protocol="starter-kit", max_length=128,
                        task_index={r.task: 0 for r in records})
    with torch.no_grad():
        before = mean_answer_loss(base, ex, tok.pad_token_id).item()
        plain = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        after = mean_answer_loss(plain, ex, tok.pad_token_id).item()
    assert after < before, (before, after)
