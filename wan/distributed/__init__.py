"""Multi-process execution of the Wan models on torch.distributed: Ulysses sequence parallelism."""

from .sequence_parallel import SequenceParallel, apply_sequence_parallel
from .ulysses import SequenceShard, head_to_seq, seq_to_head, ulysses_attention

__all__ = ["SequenceParallel", "SequenceShard", "apply_sequence_parallel", "head_to_seq", "seq_to_head",
           "ulysses_attention"]
