"""Every random stream of a training process: seeding, and the states a checkpoint saves and restores."""

import random

import numpy as np
import torch

from annkernels.train.distributed import DistributedContext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every random stream of this process, as plain Python values and tensors (loadable with weights_only)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(context: DistributedContext) -> list:
    """Every process's rng_states(), in rank order, on every process."""
    if not context.enabled:
        return [rng_states()]
    states = [None] * context.world_size
    torch.distributed.all_gather_object(states, rng_states())
    return states
