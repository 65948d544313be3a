"""FSDP2 for ``runtime.strategy: fsdp``: parameters, gradients and optimizer state sharded over the workers.

DDP (the default) keeps a full replica of the model, its gradients and AdamW's two moments on every
worker: full fine-tuning above a few billion parameters does not fit. FSDP2
(``torch.distributed.fsdp.fully_shard``) keeps 1/N of each on each of N workers and all-gathers one
decoder layer's weights at a time for its forward and backward. Each decoder layer is one sharding unit,
then the root (embeddings, final norm, LM head); with LoRA the base model's layers are sharded and the
adapter's weights, living inside them, are ordinary (sharded) parameters. With bf16 precision the
layers compute in bf16 and reduce gradients in fp32 (:class:`MixedPrecisionPolicy`); the sharded
parameters the optimizer updates stay in the model's dtype. FSDP2 runs on CPU with gloo, which is how
the tests show a 2-worker run equal to the 1-worker one.

Checkpoints are sharded (:func:`save_sharded` / :func:`load_sharded`: ``torch.distributed.checkpoint``
of the trainable weights and the optimizer state, every worker writing its own shards); at the end of a
stage :func:`full_state_dict` gathers the whole model to rank 0 (on CPU), which saves it as the plain
model every later stage and evaluation reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp")
LAYOUT = "model.model.layers (an nn.ModuleList of decoder layers: Llama, Qwen2, Mistral-style models)"


def decoder_layers(policy: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The Hugging Face model to shard as the root (the base model under a LoRA adapter) and its decoder
    layers; a ``ValueError`` naming the layout expected for any other architecture."""
    import peft

    root = policy.get_base_model() if isinstance(policy, peft.PeftModel) else policy
    layers = getattr(getattr(root, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"runtime.strategy=fsdp: cannot find the decoder layers of {type(root).__name__}; "
            f"expected {LAYOUT}. Use runtime.strategy=ddp for this model"
        )
    return root, layers


def shard_policy(policy: torch.nn.Module, device: torch.device, bf16: bool) -> None:
    """Shard ``policy`` in place over the process group: each decoder layer, then the root.

    Rank 0's weights are broadcast first: a fresh LoRA adapter is initialised from each worker's own seed,
    and the shards must be cut from one model (DDP broadcasts for the same reason)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    root, layers = decoder_layers(policy)
    with torch.no_grad():
        for tensor in [*policy.parameters(), *policy.buffers()]:
            dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp if bf16 else MixedPrecisionPolicy()}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    _check_all_sharded(policy)


def _check_all_sharded(policy: torch.nn.Module) -> None:
    """Every trainable parameter lies inside the sharded model: one outside it (a training-only head added
    to the PEFT wrapper) would be neither sharded nor averaged over the workers."""
    outside = [n for n, p in policy.named_parameters() if p.requires_grad and not is_sharded_tensor(p)]
    if outside:
        raise ValueError(
            f"runtime.strategy=fsdp: trainable parameters outside the sharded model {outside[:3]} "
            "(a head added by the objective); use runtime.strategy=ddp for this objective"
        )


def is_sharded_tensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP shards (DTensors)."""
    return any(is_sharded_tensor(p) for p in model.parameters())


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (e.g. the gradient norm of sharded parameters) gathered whole."""
    return tensor.full_tensor() if is_sharded_tensor(tensor) else tensor  # type: ignore[attr-defined]


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA run's base model) are the stage's start model: not checkpointed, as with DDP.
    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every worker writes its shards of the trainable weights and optimizer state into ``folder``
    (collective: all workers call it with the same folder)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what :func:`save_sharded` wrote, resharded to this process group (collective).

    The templates hold every trainable weight; ``dcp.load`` fails on one the checkpoint lacks, so a
    non-strict ``set_state_dict`` only skips the frozen weights, which are not in the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_options())
    dcp.load({"model": weights, "optim": optim}, checkpoint_id=str(folder))  # fills both in place
    set_state_dict(
        model, optimizer, model_state_dict=weights, optim_state_dict=optim, options=_options(strict=False)
    )


def full_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The whole model's state dict on rank 0, on CPU (empty on the other ranks; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def shared_value(value: Any) -> Any:
    """Rank 0's ``value`` on every worker (e.g. the name of a folder rank 0 created)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    dist.barrier()
