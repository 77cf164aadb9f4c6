"""Data parallelism through torchrun: the same training loop on N processes, one per device.

``torchrun --nproc_per_node N -m stillroom.cli train CONFIG`` sets RANK / WORLD_SIZE / MASTER_ADDR;
``init`` joins the process group (NCCL on GPUs, gloo on CPU). Without torchrun everything here is a
no-op for a world of one, so the loop has no separate single-process path.
"""

from __future__ import annotations

import os

# torch is imported inside the functions that need it: the pipeline (and so `stillroom validate`)
# imports this module and must stay light


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group once; CUDA ranks take the device of their local rank."""
    import torch
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_sum(*values: float) -> list[float]:
    """Each number summed over all processes, in one collective (the numbers themselves in a world of one)."""
    if world_size() == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
