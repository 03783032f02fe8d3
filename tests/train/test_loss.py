"""The answer-only loss: logits computed only at answer positions give the same losses and
gradients as full logits, and bf16 frozen weights give the products bf16 autocast computes."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from shoptune.train.format import IGNORE
from shoptune.train.loss import answer_token_losses, collate, mean_answer_loss


def tiny_lora_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():  # LoRA B starts at 0: make the adapter do something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def batch():
    # three rows of different lengths, answers at different places, right padding
    feats = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [IGNORE] * 4 + [9, 10], "task_id": 0},
             {"input_ids": [11, 12, 13], "labels": [IGNORE, 12, 13], "task_id": 1},
             {"input_ids": [20, 21, 22, 23, 24, 25, 26, 27], "labels": [IGNORE] * 7 + [27], "task_id": 0}]
    return feats, collate(feats, pad_id=0)


def reference(model, b):
    """The #4 recipe's loss: full logits, cross-entropy over every position, masked."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    target = b["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            ignore_index=IGNORE, reduction="none").view(target.shape)
    return tok[target != IGNORE]


@pytest.mark.parametrize("answer_only", [True, False])
def test_answer_only_logits_equal_full_logits(answer_only):
    model = tiny_lora_model()
    _, b = batch()
    ref = reference(model, b)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    losses, rows = answer_token_losses(model, b["input_ids"], b["attention_mask"], b["labels"],
                                       answer_logits_only=answer_only)
    assert rows.tolist() == [0, 0, 1, 1, 2]  # answer tokens per row: 2, 2, 1
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)


def test_mean_answer_loss_is_the_mean_over_answer_tokens():
    model = tiny_lora_model()
    feats, b = batch()
    torch.testing.assert_close(mean_answer_loss(model, feats, pad_id=0), reference(model, b).mean(),
                               rtol=1e-5, atol=1e-6)


def test_bf16_frozen_weights_match_autocast():
    """Pre-cast frozen weights compute exactly what autocast computes from fp32 weights."""
    model = tiny_lora_model()
    _, b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = answer_token_losses(model, b["input_ids"], b["attention_mask"], b["labels"])
    for m in model.base_model.model.model.layers.modules():
        if isinstance(m, torch.nn.Linear) and not any(p.requires_grad for p in m.parameters()):
            m.to(torch.bfloat16)
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = answer_token_losses(model, b["input_ids"], b["attention_mask"], b["labels"])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
