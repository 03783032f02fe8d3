"""Sharded training (FSDP2) through ``accelerate launch --config_file configs/accelerate/fsdp.yaml``.

On GPUs accelerate turns the config into ``fully_shard`` wrapping by itself. On CPU it does not:
``accelerate`` only switches to FSDP for GPU-like devices, so a CPU launch with an FSDP config
silently trains as plain DDP (``MULTI_CPU``). PyTorch's FSDP2 itself runs on CPU over gloo, so
:func:`fsdp_on_cpu` switches the accelerator to FSDP there: the same wrapping, sharded
parameters, gradients and optimizer state, and gathered saving as a GPU run, which is what lets
``tests/train/test_accelerate.py`` run the FSDP config on two CPU processes.

Saving: sharded parameters are DTensors; :func:`full_state_dict` gathers them (every process
must call it) so process 0 writes the same plain PEFT adapter a single process would.
"""
from __future__ import annotations

import os


def fsdp_requested() -> bool:
    """``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP``."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_on_cpu(trainer) -> bool:
    """Before training: an FSDP launch on CPU processes gets FSDP (FSDP2 over gloo), not the
    DDP accelerate would fall back to. Returns whether it switched."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    state = trainer.accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch sets
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (FSDP2 runs over gloo)")
    # both shared states: every new AcceleratorState() copies PartialState's type over its own
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return True


def full_state_dict(trainer) -> dict | None:
    """The model's full (gathered) state dict when it is sharded, else None (nothing to gather).
    A collective: every process calls it; process 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(trainer.model_wrapped, FSDPModule):
        return None
    return get_model_state_dict(trainer.model_wrapped,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
