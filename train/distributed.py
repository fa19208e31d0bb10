"""torchrun process-group setup and small helpers (torchvision references' init_distributed_mode, reshaped)."""

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name=None) -> DistributedContext:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL when the device is a GPU, gloo on CPU.

    Multi-node runs need nothing more than torchrun's usual --nnodes/--node-rank/--rdzv-endpoint arguments, and
    torchrun's --max-restarts brings a failed group back (train.py then resumes from its last checkpoint).
    """
    use_cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=torch.device("cuda" if use_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # Under torchrun the store outlives a restart, holding the keys of the group that died, gloo's peer addresses
    # among them: a restarted rank could read a dead peer's address before the new peer writes its own (seen as
    # "connectFullMesh failed ... Connection refused"). A prefix per restart keeps each attempt's keys apart.
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                            store=store, rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


@contextmanager
def process_group(device_name=None):
    """init_distributed() for the body of a `with`; the process group is destroyed on the way out, errors too."""
    context = init_distributed(device_name)
    try:
        yield context
    finally:
        if context.enabled and dist.is_initialized():
            dist.destroy_process_group()


def mean_over_processes(values: dict, context: DistributedContext) -> dict:
    """Averages a dict of float scalars over processes (for logging only)."""
    if not context.enabled:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    tensor /= context.world_size
    return dict(zip(keys, tensor.tolist(), strict=True))


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sharding without DistributedSampler's padding: rank r gets indices r, r+W, r+2W, ...

    Every sample is scored exactly once, so the all-reduced confusion matrix equals the single-process one.
    """

    def __init__(self, length: int, context: DistributedContext):
        self.indices = list(range(context.rank, length, context.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
