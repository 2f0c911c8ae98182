"""torch.distributed glue shared by the training loops (torchrun, DDP).

Under ``torchrun --nproc_per_node N vsa train-...`` the environment variables
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set; :func:`setup` then joins the
process group (nccl on GPU, gloo on CPU).  Run plainly, it is a no-op and
``world == 1``.  Only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if there is one; return this process's place in it."""
    import torch

    from vsa.runtime import pick_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return DistEnv(device=dev)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    return DistEnv(rank, world, local_rank, dev)


def wrap(model, env: DistEnv):
    """DistributedDataParallel around ``model`` when running distributed."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if env.device.startswith("cuda"):
        return DDP(model, device_ids=[env.local_rank])
    return DDP(model)


def all_reduce_mean(value: float, env: DistEnv) -> float:
    if not env.enabled:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], device=env.device)
    dist.all_reduce(t)
    return float(t.item()) / env.world


def barrier(env: DistEnv) -> None:
    if env.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(env: DistEnv, sync: bool = True) -> None:
    """Leave the process group. With ``sync`` (a normal end) all ranks meet first, so none tears down
    gloo while a peer is still finishing its last collective (that aborted a rank at exit: "terminate
    called without an active exception"); after an error, leave at once rather than wait for peers."""
    if env.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            if sync:
                dist.barrier()
            dist.destroy_process_group()


def gather_with_grad(x, env: DistEnv, sizes: list[int]):
    """Concatenate every rank's ``x`` (rank order) along dim 0; this rank's part keeps its gradient.

    ``sizes`` (rows per rank) must be known on every rank; other dims must match. Used for losses
    over the global batch (contrastive ranking loss): with the loss scaled by ``world`` and DDP's
    gradient averaging, the gradient equals the one-process gradient of the same global batch.
    """
    if not env.enabled:
        return x
    import torch
    import torch.distributed as dist

    n = max(sizes)
    pad = x.new_zeros((n, *x.shape[1:]))
    pad[: len(x)] = x.detach()
    if pad.dtype == torch.bool:
        pad = pad.to(torch.uint8)
    parts = [torch.empty_like(pad) for _ in range(env.world)]
    dist.all_gather(parts, pad.contiguous())
    parts = [p[:k].to(x.dtype) for p, k in zip(parts, sizes)]
    parts[env.rank] = x
    return torch.cat(parts)


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank (e.g. the early-stopping decision, which only rank 0 evaluates)."""
    if not env.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share(n: int, env: DistEnv) -> slice:
    """This rank's strided share of a global batch of ``n`` items (``rank::world``)."""
    return slice(env.rank, n, env.world) if env.enabled else slice(0, n)
