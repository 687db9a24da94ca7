"""Training on several processes with ``torch.distributed``: DDP, or FSDP2 with ``--fsdp``.

``train()`` joins a process group when it is started by ``torchrun`` (or by anything that
sets the standard variables ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``, such as Slurm with torchrun): gloo on the CPU, NCCL on CUDA, one device per
process.

``batch_size`` is the *global* micro-batch: the single-process data order stays the global
order, and rank ``k`` of ``W`` takes rows ``k, k + W, …`` of every global micro-batch (the
rows are sorted by length within a batch, so this also balances the padding). Two ranks
with ``batch_size=2b`` therefore see exactly what one process with ``batch_size=2b`` sees,
the same config file means the same run at any world size, and a checkpoint resumes at
another world size.

Each rank's loss is the mean over *its* counted tokens (causal LM) or rows (classifier);
the single-process loss is the mean over the counted tokens of the whole batch. So rank
``k`` differentiates ``W · n_k / n · loss_k``, and the average DDP and FSDP take over ranks
is ``Σ_k n_k / n · loss_k``: exactly the single-process loss, and its gradient.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data.encoding import Encoded, counted
from ..lora.architectures import transformer_blocks
from ..lora.config import ConfigError
from ..models.devices import choose_device

ENVIRONMENT = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "launch with torchrun --nproc_per_node N -m loralab -- train …"


class DistributedError(RuntimeError):
    """The processes could not meet, or another rank stopped; raised on every rank."""


@dataclass
class World:
    """This process's place among the training processes (one process alone by default)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    active: bool = False
    """Whether a process group is in use (also with one rank under torchrun)."""
    owns_group: bool = False
    """Whether ``join`` created the process group, so that ``leave`` destroys it."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


def world_from_environment(batch_size: int, fsdp: bool, device: str | None = None) -> World:
    """Read the launcher's variables, checking them before any process waits on another;
    one process alone runs on ``device`` (``devices.choose_device``)."""
    if dist.is_available() and dist.is_initialized():  # the caller's own process group
        rank, size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        world = World(rank, size, local_rank, _device(local_rank), active=True)
    elif _launched(fsdp):
        size = _integer_variable("WORLD_SIZE")
        missing = [name for name in ENVIRONMENT[1:] if name not in os.environ]
        missing = [m for m in missing if m != "LOCAL_RANK"]  # defaults to RANK on one node
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={size} asks for {size} processes, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set: {LAUNCH_HINT} (it sets "
                "all of them), or set MASTER_ADDR and MASTER_PORT to rank 0's host and a free port"
            )
        rank = _integer_variable("RANK")
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if not 0 <= rank < size:
            raise ConfigError(f"RANK={rank} is outside 0..{size - 1} (WORLD_SIZE={size})")
        world = World(rank, size, local_rank, _device(local_rank), active=True)
    else:
        if fsdp:
            raise ConfigError(f"--fsdp shards the model across processes: {LAUNCH_HINT}")
        return World(device=choose_device(device))
    if batch_size % world.size:
        raise ConfigError(
            f"batch_size={batch_size} is the global micro-batch and must be divisible by the "
            f"world size {world.size} (each rank takes batch_size / {world.size} examples); "
            f"use a multiple of {world.size}"
        )
    return world


def _launched(fsdp: bool) -> bool:
    """Whether a launcher started this process as one of a group: several processes, or
    one with a rendezvous address (``torchrun --nproc_per_node 1``), or one asked to shard.
    A stray ``WORLD_SIZE=1`` alone leaves a plain single-process run."""
    if "WORLD_SIZE" not in os.environ:
        return False
    return _integer_variable("WORLD_SIZE") > 1 or "MASTER_ADDR" in os.environ or fsdp


def _integer_variable(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None


def _device(local_rank: int) -> torch.device:
    """One GPU per process, chosen by the local rank; the CPU when there is no GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local_rank}, but this machine has {torch.cuda.device_count()} "
            "GPUs: start at most one process per GPU (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def join(world: World) -> None:
    """Join the process group (unless the caller already did): gloo on CPU, NCCL on CUDA."""
    if not world.active or dist.is_initialized():
        return
    cuda = world.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(world.device)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=world.rank,
            world_size=world.size,
            device_id=world.device if cuda else None,
        )
    except (RuntimeError, ValueError, TimeoutError) as error:
        raise DistributedError(
            f"{world.describe()} could not join the other processes at {where}: {error}"
        ) from None
    world.owns_group = True


def leave(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        world.owns_group = False


@contextlib.contextmanager
def peers_checked(world: World, checkpoint_hint: str) -> Iterator[None]:
    """Turn a collective that failed because another rank stopped into a clear error."""
    if not world.active:
        yield
        return
    try:
        yield
    except RuntimeError as error:  # dist.DistError is one too
        if not _is_peer_failure(error):
            raise
        raise DistributedError(
            f"{world.describe()}: another rank stopped, so this one stops too (its own error "
            f"is in its output); {checkpoint_hint}. The collective reported: {error}"
        ) from None


def _is_peer_failure(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    signs = ("Connection closed by peer", "Connection reset by peer", "remote process exited")
    return any(sign in text for sign in signs)


# -- the data each rank takes ---------------------------------------------------------------


def rows_of_rank(world: World, items: list[Encoded]) -> tuple[list[Encoded], float]:
    """This rank's rows of a global micro-batch, and their share of its counted tokens.

    A short batch (the last of an epoch) may leave a rank nothing: it then runs the first
    row with share 0, because every rank must take part in every forward and backward."""
    if not world.active:
        return items, 1.0
    mine = items[world.rank :: world.size]
    if not mine:
        return items[:1], 0.0
    return mine, sum(map(counted, mine)) / sum(map(counted, items))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


# -- collectives ----------------------------------------------------------------------------


def sum_over_ranks(world: World, values: list[float]) -> list[float]:
    if not world.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.active:
        # A barrier is an all-reduce on gloo; on NCCL it needs the device.
        dist.barrier(device_ids=[world.device.index] if world.device.type == "cuda" else None)


def from_main(world: World, produce: Callable[[], Any]) -> Any:
    """Rank 0 runs ``produce`` and every rank gets its value, or raises its ``ConfigError``
    (so a bad ``--resume`` fails on every rank, not on rank 0 alone while the rest wait)."""
    if not world.active:
        return produce()
    message: list[Any] = [None]
    if world.is_main:
        try:
            message[0] = ("value", produce())
        except ConfigError as error:
            message[0] = ("error", str(error))
    dist.broadcast_object_list(message, src=0, device=_object_device(world))
    kind, payload = message[0]
    if kind == "error":
        raise ConfigError(payload)
    return payload


def _object_device(world: World) -> torch.device | None:
    return world.device if world.device.type == "cuda" else None


def gather_objects(world: World, value: Any) -> list[Any]:
    if not world.active:
        return [value]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


@contextlib.contextmanager
def shared_directory(world: World, directory: Path) -> Iterator[Path]:
    """``directory`` on rank 0; on the other ranks, a local copy of it sent by rank 0.

    Only rank 0 needs to see the run directory (several nodes need not share a disk)."""
    if not world.active:
        yield directory
        return
    files = None
    if world.is_main:
        files = {
            str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }
    files = from_main(world, lambda: files)
    if world.is_main:
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="loralab-checkpoint-") as copy:
        for name, content in files.items():
            target = Path(copy) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        yield Path(copy)


# -- wrapping the model -----------------------------------------------------------------------


def wrap_ddp(model: nn.Module, world: World) -> nn.Module:
    """DDP over the trainable parameters only: the frozen base and the buffers are neither
    broadcast nor reduced (every rank loaded the same weights)."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    buffers = [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
    return DistributedDataParallel(
        model,
        device_ids=[world.device.index] if world.device.type == "cuda" else None,
    )


def shard_fsdp(model: nn.Module, world: World) -> nn.Module:
    """FSDP2: each transformer block is one unit (gathered for its forward and backward,
    then resharded), the rest of the model the root unit. Frozen and trainable parameters
    share the units; only the trainable ones get gradients to reduce-scatter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    for _, block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(world: World, runner: nn.Module, last: bool) -> Iterator[None]:
    """Reduce gradients only on the last micro-batch of a step (the sum is the same)."""
    if not world.active or last:
        if hasattr(runner, "set_requires_gradient_sync"):  # FSDP2
            runner.set_requires_gradient_sync(True)
        yield
    elif hasattr(runner, "no_sync"):  # DDP
        with runner.no_sync():
            yield
    else:
        runner.set_requires_gradient_sync(False)
        yield


def _is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def full_trainable_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block, every sharded trainable parameter is a whole tensor on the CPU.

    Every rank must enter it (gathering is collective), in the same order; rank 0 then saves
    with the ordinary ``save_method``. Only the trainable parameters are gathered, never the
    frozen base."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}  # a tied parameter stays one parameter
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not parameter.requires_grad or not _is_sharded(parameter):
                continue
            if id(parameter) not in whole:
                full = parameter.detach().full_tensor().cpu()
                whole[id(parameter)] = nn.Parameter(full, requires_grad=True)
            module._parameters[name] = whole[id(parameter)]
            swapped.append((module, name, parameter))
    try:
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole onto the CPU: the
    same layout as a single process's, so a checkpoint resumes under DDP, FSDP or neither."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {
            key: value.full_tensor().cpu() if _is_sharded(value) else value
            for key, value in entry.items()
        }
        for index, entry in state["state"].items()
    }
    return state


def shard_optimizer_state(state: dict, parameters: list[nn.Parameter]) -> dict:
    """The inverse of ``full_optimizer_state`` for sharded ``parameters``: each rank cuts its
    own piece of every whole tensor (they all read the same file; nothing is sent)."""
    from torch.distributed.tensor import distribute_tensor

    for index, entry in state["state"].items():
        parameter = parameters[index]
        if not _is_sharded(parameter):
            continue
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == parameter.shape and value.dim() > 0:
                entry[key] = distribute_tensor(
                    value.to(parameter.device_mesh.device_type),
                    parameter.device_mesh,
                    parameter.placements,
                    src_data_rank=None,
                )
    return state


def rng_state(world: World) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(world.device)
    return state


def set_rng_state(world: World, state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and world.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], world.device)
