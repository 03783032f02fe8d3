"""Padding-free packing: a packed batch has the loss, the gradients and the per-task losses of the
same examples padded (fp32), and attention never crosses examples. A tiny random Llama (GQA, like
SmolLM2) with LoRA whose B matrices are non-zero, so every LoRA weight gets a gradient."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from shoptune.train.format import IGNORE
from shoptune.train.loss import answer_token_losses, collate
from shoptune.train.packing import VARLEN, collate_packed, example_index
from shoptune.train.trainer import ShopTrainer


def tiny_lora_model(attn: str):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=256,
                      tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).float()
    base.set_attn_implementation(attn)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "o_proj", "gate_proj", "up_proj",
                                                                                "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (n_prompt, n_answer) in enumerate([(9, 3), (1, 5), (17, 2), (4, 4), (30, 1)]):
        ids = torch.randint(3, 97, (n_prompt + n_answer,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:], "task_id": i % 3,
                    "length": len(ids)})
    return out


def trainer_for(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=5)
    return ShopTrainer(model=model, args=args, task_names=["a", "b", "c"],
                       task_weights=torch.tensor([1.0, 2.0, 0.5]))


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("attn", [VARLEN, "sdpa"])  # our per-example SDPA; transformers' block mask
@pytest.mark.parametrize("answer_logits_only", [True, False])
def test_packed_batch_has_the_loss_and_gradients_of_the_padded_batch(tmp_path, attn, answer_logits_only):
    trainer = trainer_for(tiny_lora_model(attn), tmp_path)
    trainer.answer_logits_only = answer_logits_only
    feats = examples()
    padded = collate(feats, pad_id=0)
    packed = collate_packed(feats)
    assert packed["input_ids"].shape == (1, sum(f["length"] for f in feats))  # no padding at all
    assert "attention_mask" not in packed
    loss_pad, g_pad = loss_and_grads(trainer, padded)
    task_pad = (trainer._task_sum.clone(), trainer._task_n.clone())
    trainer._task_sum.zero_()
    trainer._task_n.zero_()
    loss_pack, g_pack = loss_and_grads(trainer, packed)
    assert torch.allclose(loss_pack, loss_pad, atol=1e-5, rtol=1e-5), (loss_pack, loss_pad)
    assert g_pad.keys() == g_pack.keys() and len(g_pad) == 2 * 7 * 2  # A and B of 7 modules x 2 layers
    for n in g_pad:
        assert torch.allclose(g_pack[n], g_pad[n], atol=1e-5, rtol=1e-4), n
    # per-task logging: the same answer-token sums and counts per task
    assert torch.allclose(trainer._task_sum, task_pad[0], atol=1e-5) and torch.equal(trainer._task_n, task_pad[1])
    assert trainer._task_n.tolist() == [3 + 4, 5 + 1, 2]


def test_attention_never_crosses_examples():
    model = tiny_lora_model(VARLEN).eval()
    feats = examples()
    changed = [dict(f) for f in feats]
    changed[0] = {**feats[0], "input_ids": [5] * len(feats[0]["input_ids"])}  # rewrite the first example
    with torch.no_grad():
        a, rows_a = answer_token_losses(model, **_model_inputs(collate_packed(feats)))
        b, rows_b = answer_token_losses(model, **_model_inputs(collate_packed(changed)))
    assert torch.equal(rows_a, rows_b)
    assert not torch.allclose(a[rows_a == 0], b[rows_b == 0])  # the rewritten example's loss moved ...
    assert torch.allclose(a[rows_a > 0], b[rows_b > 0], atol=1e-6)  # ... and no other example's did


def _model_inputs(batch):
    batch = dict(batch)
    batch.pop("task_ids")
    return {"input_ids": batch.pop("input_ids"), "labels": batch.pop("labels"), "attention_mask": None, **batch}


def test_packed_labels_positions_and_example_index():
    feats = [{"input_ids": [7, 8, 9], "labels": [IGNORE, 8, 9], "task_id": 2},
             {"input_ids": [4, 5], "labels": [4, 5], "task_id": 0}]  # an answer from its first token on
    b = collate_packed(feats)
    assert b["input_ids"].tolist() == [[7, 8, 9, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the second example's first token is never a target (it would be predicted from the first example)
    assert b["labels"].tolist() == [[IGNORE, 8, 9, IGNORE, 5]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5] and b["task_ids"].tolist() == [2, 0]
    assert example_index(b["position_ids"]).tolist() == [[0, 0, 0, 1, 1]]
