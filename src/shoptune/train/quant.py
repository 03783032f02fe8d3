"""QLoRA (``quantization: nf4|int8``): the frozen base loaded k-bit by bitsandbytes.

transformers' ``BitsAndBytesConfig`` quantizes the decoder's Linear layers while loading (nf4:
4-bit NormalFloat with double-quantized block constants, the QLoRA paper's recipe; int8:
LLM.int8()); embeddings, norms and the LM head stay unquantized. peft's
``prepare_model_for_kbit_training`` then freezes everything, casts the unquantized parameters to
fp32 and turns on gradient checkpointing. LoRA layers on top train in fp32 and are saved as a
plain LoRA adapter: it loads on the unquantized base like any other (``tests/train/test_quant.py``).

bitsandbytes >= 0.48 ships a CPU library, so the same code runs (slowly) on CPU; on GPU each
process loads its copy onto its own device (``LOCAL_RANK``), as DDP needs.
"""
from __future__ import annotations

import os

import torch


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for ``nf4`` or ``int8``."""
    from transformers import BitsAndBytesConfig
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization: one of nf4, int8, none (got {kind!r})")


def load_quantized(model_name: str, kind: str, *, compute_dtype: torch.dtype = torch.float32,
                   gradient_checkpointing: bool = True):
    """``(model, tokenizer)``: the base with k-bit decoder Linear layers, prepared for k-bit
    training (frozen, unquantized parameters in fp32, checkpointing as asked)."""
    try:
        import bitsandbytes  # noqa: F401 - fail early with one clear line
    except ImportError:
        raise ValueError(f"quantization: {kind} needs bitsandbytes (`pip install bitsandbytes`; "
                         "pinned in requirements.txt)") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from shoptune.models import load_tokenizer, resolve
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        str(resolve(model_name)), dtype=compute_dtype, device_map={"": device},
        quantization_config=quantization_config(kind, compute_dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model.train()
    return model, load_tokenizer(model_name)


def quantized_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """The bitsandbytes k-bit Linear layers in ``model`` (looking through peft's wrappers)."""
    import bitsandbytes as bnb
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
