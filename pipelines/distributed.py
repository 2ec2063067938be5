"""Multi-process inference under torchrun: the process group, and Ulysses sequence parallelism and FSDP
weight sharding applied to loaded components (`wan.distributed`, and the trainers' `apply_fsdp`).

Every process runs the whole pipeline on the same inputs. The DiT returns its whole prediction on
every rank, so the text encoder, the sampler and the VAE compute the same values everywhere and
generation needs no other coordination; only rank 0 should write files.

- `ulysses_size` N (= the number of processes): each rank runs the DiT's blocks on 1/N of the tokens.
- `dit_fsdp` / `t5_fsdp`: each rank keeps 1/N of the DiT's / umT5's weights (FSDP2, one unit per
  block); a block's weights are gathered for its forward and freed after it. The components are
  loaded whole on every rank first, then sharded.

`trainers.parallelize` (the trainers' process group and FSDP hooks) is imported only when parallelism
is asked for: it brings the training stack with it.
"""

import os
from dataclasses import dataclass

import torch.distributed as dist

from wan.distributed import apply_sequence_parallel

from .validation import InvalidInput


@dataclass(frozen=True)
class ParallelOptions:
    ulysses_size: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    @property
    def enabled(self):
        return self.ulysses_size > 1 or self.dit_fsdp or self.t5_fsdp


def launched_processes():
    """The number of processes torchrun started (1 for a plain `python`)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_parallel(options, processes, causal=False, offload_model=False, t5_cpu=False):
    """Raises `InvalidInput` for options that cannot run; checked before any weights are loaded."""
    n = options.ulysses_size
    if n < 1:
        raise InvalidInput(f"--ulysses_size must be >= 1, got {n}")
    if n not in (1, processes):
        raise InvalidInput(f"--ulysses_size {n} must equal the number of processes ({processes}): "
                           f"torchrun --nproc_per_node {n} inference.py ... --ulysses_size {n}")
    if processes > 1 and not options.enabled:
        raise InvalidInput(f"{processes} processes with nothing to split: pass --ulysses_size {processes} "
                           f"and/or --dit_fsdp / --t5_fsdp")
    if options.dit_fsdp and causal:
        raise InvalidInput("--dit_fsdp does not run causal configs (the KV-cache pipeline calls the DiT's layers "
                           "outside its forward); use --ulysses_size")
    if options.dit_fsdp and offload_model:
        raise InvalidInput("--dit_fsdp shards the DiT over the GPUs; it cannot be combined with --offload_model")
    if options.t5_fsdp and t5_cpu:
        raise InvalidInput("--t5_fsdp shards the text encoder over the GPUs; it cannot be combined with --t5_cpu")


def init_parallel(options):
    """Joins the torchrun process group (or makes a 1-process one) when `options` ask for parallelism;
    returns its `DistEnv` (rank, device: the process's GPU, or the CPU), or None."""
    if not options.enabled:
        return None
    from trainers.parallelize import init_distributed

    return init_distributed()


def close_parallel(env):
    if env is not None and env.owns_group:
        dist.destroy_process_group()


def parallelize(components, options):
    """Applies sequence parallelism and FSDP to loaded `WanComponents` in place (every WanModel of the
    DiT, both A14B experts included); returns them."""
    if not options.enabled:
        return components
    from trainers.parallelize import apply_fsdp

    if options.ulysses_size > 1:
        apply_sequence_parallel(components.dit)
    if options.dit_fsdp:
        apply_fsdp(components.dit)
    if options.t5_fsdp:
        apply_fsdp(components.text_encoder.model)
    return components
