"""CPU offload of DiT weights, applied from outside the model with forward hooks.

- `apply_block_swap(model, blocks_to_swap, device)`: the last `blocks_to_swap` transformer blocks keep
  their frozen weights in (pinned) CPU memory; each is copied onto `device` just before it runs and
  dropped right after, so at most one swapped block is resident. Inference, and LoRA training: the
  trainable (LoRA) weights stay on `device`; in training a swapped block must use activation
  checkpointing (its weights are copied in again for the recomputation in backward).
- `apply_model_offload(model, device)`: the whole model lives on the CPU and moves to `device` for
  each forward (diffusers' `enable_model_cpu_offload`, per model).
- `apply_memory_mode(model, mode, device)`: VideoX-Fun's `GPU_memory_mode` names mapped onto the above
  and `wan.fp8.quantize_fp8`.

Offloading costs no copy: the CPU copy of a frozen weight stays valid, so a weight is "moved back" by
pointing the parameter at it again.
"""

import torch

from .fp8 import quantize_fp8

MEMORY_MODES = ("model_full_load", "model_full_load_and_qfloat8", "model_cpu_offload",
                "model_cpu_offload_and_qfloat8", "sequential_cpu_offload")


class OffloadedModule:
    """The frozen parameters and the buffers of `module`, kept on the CPU and copied to `device` on demand."""

    def __init__(self, module, device):
        self.device = torch.device(device)
        pin = torch.cuda.is_available() and self.device.type == "cuda"
        self.tensors = [t for t in list(module.parameters()) + list(module.buffers()) if not t.requires_grad]
        for t in self.tensors:
            t.data = t.data.to("cpu")
            if pin:
                t.data = t.data.pin_memory()
        self.cpu_data = [t.data for t in self.tensors]
        self.resident = False

    def load(self):
        """Copies the weights to the device (a real copy even on the CPU, so offloading is observable)."""
        if not self.resident:
            for t, cpu in zip(self.tensors, self.cpu_data):
                t.data = cpu.to(self.device, non_blocking=True, copy=True)
            self.resident = True

    def offload(self):
        if self.resident:
            for t, cpu in zip(self.tensors, self.cpu_data):
                t.data = cpu
            self.resident = False


def _is_lora(param, block):
    return any(param is p for name, p in block.named_parameters() if ".lora_" in f".{name}")


def _checkpointed(model, index):
    flags = getattr(model, "gradient_checkpointing", None)
    return bool(flags and flags[index])


def apply_block_swap(model, blocks_to_swap, device):
    """Keeps the weights of the last `blocks_to_swap` of `model.blocks` on the CPU between uses; the rest
    of the model moves to `device`. Returns the `OffloadedModule` of each swapped block."""
    blocks = model.blocks
    if not 0 <= blocks_to_swap <= len(blocks):
        raise ValueError(f"blocks_to_swap must be between 0 and the number of blocks ({len(blocks)}), "
                         f"got {blocks_to_swap}")
    first = len(blocks) - blocks_to_swap
    if any(p.requires_grad for i in range(first, len(blocks)) for p in blocks[i].parameters()
           if not _is_lora(p, blocks[i])):
        raise ValueError("blocks_to_swap offloads frozen weights only, and the blocks to swap have trainable base "
                         "weights: call model.requires_grad_(False) for inference, or train LoRA adapters "
                         "(wan.lora.inject_lora freezes the base)")
    swapped = {}
    for i in range(first, len(blocks)):
        swapped[i] = OffloadedModule(blocks[i], device)
    for name, module in model.named_children():
        if name != "blocks":
            module.to(device)
    for i in range(first):
        blocks[i].to(device)
    for t in [p for i in swapped for p in blocks[i].parameters() if p.requires_grad]:
        t.data = t.data.to(device)  # trainable (LoRA) weights stay resident: the optimizer updates them there

    for i, offloaded in swapped.items():
        def before(module, inputs, offloaded=offloaded, i=i):
            if torch.is_grad_enabled() and not _checkpointed(model, i):
                raise RuntimeError(f"block {i} is swapped to the CPU but runs with gradients and no activation "
                                   f"checkpointing; call model.set_gradient_checkpointing(True) for training "
                                   f"with blocks_to_swap")
            offloaded.load()

        def after(module, inputs, output, offloaded=offloaded):
            offloaded.offload()

        blocks[i].register_forward_pre_hook(before)
        blocks[i].register_forward_hook(after)
    model.swapped_blocks = swapped
    return list(swapped.values())


def apply_model_offload(model, device):
    """The whole model stays on the CPU and is copied to `device` for each forward call."""
    offloaded = OffloadedModule(model, device)
    model.register_forward_pre_hook(lambda module, inputs: offloaded.load())
    model.register_forward_hook(lambda module, inputs, output: offloaded.offload())
    return offloaded


def apply_memory_mode(model, mode, device):
    """VideoX-Fun's `GPU_memory_mode` for a DiT (inference):

    model_full_load                  everything on `device`
    model_full_load_and_qfloat8      fp8 linear weights (`quantize_fp8`), on `device`
    model_cpu_offload                on the CPU between forward calls (`apply_model_offload`)
    model_cpu_offload_and_qfloat8    fp8 linear weights + the above
    sequential_cpu_offload           every block swapped (`apply_block_swap`); embeddings and head,
                                     a few percent of the weights, stay on `device`
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode '{mode}'; expected one of {', '.join(MEMORY_MODES)}")
    model.requires_grad_(False)
    if mode.endswith("qfloat8"):
        quantize_fp8(model)
    if mode.startswith("model_full_load"):
        return model.to(device)
    if mode.startswith("model_cpu_offload"):
        apply_model_offload(model, device)
    else:
        apply_block_swap(model, len(model.blocks), device)
    return model
