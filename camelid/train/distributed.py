"""One process or many: the process group, the device mesh and FSDP2 sharding, on PyTorch's own engine.

Under torchrun (WORLD_SIZE > 1 in the environment) `setup()` starts the process group (nccl on CUDA, gloo on
CPU) and a one-dimensional device mesh; `shard()` applies FSDP2's `fully_shard` to each block, then to the
root (as torchtitan does). In one process nothing is started and every collective here is the identity, so
the training loop reads the same either way.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: its rank among `world` processes, its device and the mesh (None alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh when world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes metrics, progress and the non-tensor checkpoint files."""
        return self.rank == 0


def launched() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | str | None = None) -> DistContext:
    """The context of this process; under torchrun, start the process group and the device mesh (once).

    device: the single-process device (default CPU). Under torchrun it is cuda:LOCAL_RANK when CUDA is
    available, else the CPU.
    """
    if not launched():
        return DistContext(device=torch.device(device or "cpu"))
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        atexit.register(teardown)
    world = dist.get_world_size()
    # the mesh's device type is passed explicitly: on CPU, FSDP2 must not guess (interop-facts.md)
    mesh = init_device_mesh(dev.type, (world,))
    return DistContext(rank=dist.get_rank(), world=world, local_rank=local_rank, device=dev, mesh=mesh)


def teardown() -> None:
    """Destroy the process group if one is running (registered at exit by setup)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: nn.Module, ctx: DistContext) -> nn.Module:
    """FSDP2: `fully_shard` each block of `model.layers`, then the root. Frozen parameters are sharded
    too (they need no gradient); the module's parameters become DTensors, so build the optimizer after."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    return model


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `t` over all processes in place (the identity in one process); returns `t`."""
    if ctx.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        dist.barrier()


def gather_objects(obj: object, ctx: DistContext) -> list:
    """Every process's `obj`, in rank order (pickled; for small things such as RNG states)."""
    if ctx.world == 1:
        return [obj]
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out
