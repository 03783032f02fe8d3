"""Padding-free packing (``packing: true``): a batch's examples concatenated into one row.

transformers' ``DataCollatorWithFlattening`` does the concatenation: position ids restart at 0
for every example, the first label of each example becomes -100 (so no token is ever trained to
predict the next example's first token), and ``cu_seq_lens_q/k`` mark the example boundaries.
No padding is computed on, so a batch costs exactly its tokens.

Attention must never cross examples. Flash-attention (GPU) reads ``cu_seq_lens`` itself
(varlen kernels). Elsewhere (CPU) :func:`varlen_sdpa` is registered as an attention
implementation: it runs PyTorch's SDPA once per example with a causal mask, which costs
sum(len_i^2) like the padded batch, not the (sum len_i)^2 a block-diagonal 4D mask over the
packed row would cost. Batches that come with a padding mask (generation, validation) go to
plain SDPA unchanged.

The examples of a packed batch are the same examples, in the same order, as the padded batch
would have held (the sampler is not touched), so the loss and its gradients are the same
(``tests/train/test_packing.py``); each example keeps its task id for the per-task loss.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, DataCollatorWithFlattening
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from shoptune.train.format import IGNORE

VARLEN = "shoptune_varlen_sdpa"
_flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE,
                                      return_flash_attn_kwargs=True)


def collate_packed(features: list[dict]) -> dict:
    """One row of shape (1, total tokens): input_ids, labels, position_ids, cu_seq_lens_q/k,
    max_length_q/k, plus one task id per example (no attention_mask: nothing is padded)."""
    batch = _flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
    batch["task_ids"] = torch.tensor([f["task_id"] for f in features])
    if "group_id" in features[0]:  # the loss balancer's groups, one per example like task ids
        batch["group_ids"] = torch.tensor([f["group_id"] for f in features])
    return batch


def example_index(position_ids: torch.Tensor) -> torch.Tensor:
    """Which packed example each token belongs to (0, 0, 0, 1, 1, 2, ...), counted over the
    flattened batch: a new example starts wherever the position id is 0."""
    return ((position_ids == 0).flatten().cumsum(0) - 1).view_as(position_ids)


def varlen_sdpa(module, query, key, value, attention_mask, *, cu_seq_lens_q=None,
                cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """SDPA per packed example (causal within each, nothing across); plain SDPA otherwise."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                   None, **kwargs)[0] for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1), None  # (1, T, heads, head_dim), as sdpa returns it


AttentionInterface.register(VARLEN, varlen_sdpa)
AttentionMaskInterface.register(VARLEN, sdpa_mask)  # padded batches get the usual SDPA mask


def use_packed_attention(model) -> str:
    """Switch ``model`` (a transformers model) to an attention implementation that keeps packed
    examples apart: flash-attention's varlen kernel where it is installed, else ``varlen_sdpa``."""
    from transformers.utils import is_flash_attn_2_available
    impl = "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else VARLEN
    model.set_attn_implementation(impl)
    return impl
