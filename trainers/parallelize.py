"""Parallelism applied from outside the model (torchtitan style): the process group, activation
checkpointing, torch.compile of the blocks, FSDP2 sharding with mixed precision, and filling the
sharded weights.

The trainable weights stay fp32 (the master copy the optimizer updates); FSDP all-gathers them in
the compute dtype for forward/backward and reduces gradients in fp32.
"""

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from wan.fp8 import FP8
from wan.modules.model import WanModel


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this process created the group (plain `python train.py`) and destroys it

    @property
    def is_main(self):
        return self.rank == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Joins the torchrun process group, or makes a 1-process one: NCCL on GPU, gloo on CPU."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return DistEnv(dist.get_rank(), dist.get_world_size(), device, owns)


def apply_activation_checkpointing(model):
    """Recompute every block's activations in backward (of each WanModel in `model`)."""
    for module in model.modules():
        if isinstance(module, WanModel):
            module.set_gradient_checkpointing(True)


def apply_compile(model, backend="inductor", mode=None, fullgraph=False):
    """torch.compile every transformer block in place (of each WanModel in `model`): the blocks are
    identical, so one compiled graph serves them all, and on GPU inductor fuses the norms, modulation,
    RoPE and gating around the matmuls. State-dict keys are unchanged. Apply after FSDP/checkpointing."""
    compiled = 0
    for module in model.modules():
        if isinstance(module, WanModel):
            for block in module.blocks:
                block.compile(backend=backend, mode=mode, fullgraph=fullgraph)
                compiled += 1
    if not compiled:
        raise ValueError(f"apply_compile: {type(model).__name__} holds no WanModel whose blocks could be compiled")
    return model


def apply_fsdp(model, param_dtype=None, reduce_dtype=torch.float32):
    """FSDP2: one unit per block of every ModuleList (the transformer blocks), one per network of a
    ModuleDict (a multi-network trainer calls each on its own), then the root (unless a ModuleDict:
    it has neither weights of its own nor a forward).

    param_dtype: the dtype weights are gathered and computed in (None: their own, which must be uniform).
    Inputs are not cast: the models cast them where they meet the weights, and timesteps keep fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for kind in (nn.ModuleList, nn.ModuleDict):  # inner units first
        for module in list(model.modules()):
            if isinstance(module, kind):
                for unit in (module.values() if kind is nn.ModuleDict else module):
                    fully_shard(unit, mp_policy=policy)
    if not isinstance(model, nn.ModuleDict):
        fully_shard(model, mp_policy=policy)
    return model


def materialize(model, state, device):
    """Allocates a meta-device (sharded) model on `device` and fills it from the full state dict
    `state`, read on rank 0 only (other ranks pass None) and broadcast shard by shard. fp8 weights
    (`wan.fp8.FP8Linear`) travel as their bytes: the collectives have no float8 type."""
    model.to_empty(device=device)
    state = dict(state) if state is not None else {}
    fp8 = {name: p for name, p in model.named_parameters() if p.dtype == FP8}
    if fp8 and dist.get_rank() == 0:
        missing = sorted(set(model.state_dict()) - set(state))
        if missing:
            raise KeyError(f"the starting state lacks {len(missing)} key(s) of the model: {missing[:10]}")
    set_model_state_dict(model, {k: v for k, v in state.items() if k not in fp8},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not fp8))
    for name, param in fp8.items():
        broadcast_fp8(param, state.get(name), device)
    return model


def broadcast_fp8(param, full, device):
    """Fills fp8 parameter `param` (sharded DTensor or plain) with the full tensor `full` of rank 0,
    sent as uint8."""
    data = (full if full is not None else torch.empty(param.shape, dtype=FP8)).to(device).contiguous()
    data = data.view(torch.uint8)
    dist.broadcast(data, src=0)
    if isinstance(param, DTensor):
        local = distribute_tensor(data, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().view(torch.uint8).copy_(local)
    else:
        param.data.view(torch.uint8).copy_(data)
