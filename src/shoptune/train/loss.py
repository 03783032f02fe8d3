"""Batches and the answer-only loss, shared by the trainer and the curriculum's probes.

The loss is on answer tokens only, so the 49k-wide LM head only has to run where an answer token
is predicted: ``answer_token_losses`` passes the model a boolean ``logits_to_keep`` mask
(transformers slices the hidden states before ``lm_head``), which gives the same loss as full
logits with a fraction of the head's FLOPs and activation memory. It goes through the model's
own ``forward``, so DDP/FSDP wrappers see a normal call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shoptune.train.format import IGNORE


def collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad a batch; labels -100 on padding; carry each row's task id (and its ``route_id``
    / ``group_id`` when the examples have them)."""
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_id, dtype=torch.long)
    labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        labels[i, :k] = torch.tensor(f["labels"])
        mask[i, :k] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
           "task_ids": torch.tensor([f["task_id"] for f in features])}
    for key in ("route_id", "group_id"):  # Poly's routing; the loss balancer's groups
        if key in features[0]:
            out[key + "s"] = torch.tensor([f[key] for f in features])
    return out


def answer_token_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        labels: torch.Tensor, *, answer_logits_only: bool = True,
                        route_ids: torch.Tensor | None = None, **packed
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every answer token, flat, and the example each one belongs to: its batch
    row, or with a packed batch (``packed``: position_ids, cu_seq_lens_q/k, ... from
    ``packing.collate_packed``, passed on to the model) its example within the row.

    ``answer_logits_only=False`` computes logits at every position (the reference path).
    ``route_ids``: each row's Poly task id (peft's ``task_ids``), for routed adapters."""
    # use_cache=False: a training forward keeps no KV cache (transformers would build one, and
    # its Python-side updates break a compiled layer's graph)
    extra = {"use_cache": False, **({"task_ids": route_ids} if route_ids is not None else {})}
    target = labels[:, 1:]
    keep = target != IGNORE  # (B, L-1): positions whose next token is an answer token
    if answer_logits_only:
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = keep
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=mask, **packed, **extra).logits.float()  # (N, V), row-major order of mask
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       **packed, **extra).logits[:, :-1][keep].float()
    losses = F.cross_entropy(logits, target[keep], reduction="none")
    if "position_ids" in packed:
        from shoptune.train.packing import example_index
        rows = example_index(packed["position_ids"])[:, 1:][keep]
    else:
        rows = keep.nonzero()[:, 0]
    return losses, rows


def autocast_for(model):
    """bf16 autocast when the model holds bf16 weights (the recipe's frozen base under
    ``base_dtype: bf16``), so code outside the Trainer's own autocast (probes, validation,
    periodic evaluation) can run it; a no-op context otherwise."""
    p = next(model.parameters())
    has_bf16 = any(q.dtype == torch.bfloat16 for q in model.parameters())
    return torch.autocast(p.device.type, dtype=torch.bfloat16, enabled=has_bf16)


def mean_answer_loss(model, batch: list[dict], pad_id: int, *, answer_logits_only: bool = True
                     ) -> torch.Tensor:
    """Mean answer-token loss of a list of encoded examples (probes, validation)."""
    b = collate(batch, pad_id)
    with autocast_for(model):
        losses, _ = answer_token_losses(model, b["input_ids"], b["attention_mask"], b["labels"],
                                        answer_logits_only=answer_logits_only)
    return losses.mean() if losses.numel() else losses.sum()
