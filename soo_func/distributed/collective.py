"""One all-reduce of many tensors in one flat buffer, the once-per-function metadata check,
and the error a failed collective raises.

A data-parallel oracle returns several tensors that all need the same reduction (a value
and every gradient leaf): they are concatenated into one buffer (in the widest dtype among
them), all-reduced once and split back, so one oracle call is one collective whatever the
number of leaves. Every rank receives the same bits (the reduction is one sum), so every
rank takes the same decisions on them.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import time
from typing import Any

import optree
import torch
import torch.distributed as dist

PyTree = Any

__all__ = ["REDUCTIONS", "Collective", "DistributedOracleError", "metadata_of"]

REDUCTIONS = ("sum", "mean")


class DistributedOracleError(RuntimeError):
    """A collective of a data-parallel oracle failed (another rank raised, exited, or took
    another path and never joined it), or the shards disagree on the params' metadata."""


def metadata_of(params: PyTree) -> str:
    """The params' structure, shapes, dtypes and device types as text (device indices are
    left out: one device per rank is the normal GPU layout)."""
    leaves, spec = optree.tree_flatten(params)
    described = [
        f"{tuple(t.shape)}:{t.dtype}:{t.device.type}" if isinstance(t, torch.Tensor) else repr(t)
        for t in leaves
    ]
    return f"{spec} | {', '.join(described)}"


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


class Collective:
    """The collectives of one sharded function: ``group`` (``None``: the default group),
    ``reduce`` (``"sum"``: the global function is the sum of the shards; ``"mean"``: their
    mean, the shards being of equal size), ``timeout`` in seconds for each collective
    (``None``: the group's own timeout). Counts its all-reduces in ``num_collectives``."""

    def __init__(self, group: Any = None, reduce: str = "mean", timeout: float | None = None):
        if reduce not in REDUCTIONS:
            raise ValueError(f"data_parallel: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"data_parallel: timeout must be positive seconds, got {timeout!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "data_parallel needs an initialized torch.distributed process group: call "
                "torch.distributed.init_process_group(...) first (torchrun sets its env vars)"
            )
        self.group = group
        self.reduce = reduce
        self.timeout = timeout
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.num_collectives = 0
        self.checked = False

    def _wait(self, work: Any, what: str) -> None:
        start = time.monotonic()
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as err:
            raise DistributedOracleError(
                f"rank {self.rank} of {self.world_size}: the all-reduce of {what} failed after "
                f"{time.monotonic() - start:.1f} s (timeout: "
                f"{'the group default' if self.timeout is None else f'{self.timeout} s'}); "
                "another rank raised, exited, or did not make the same oracle call. "
                f"Cause: {err}"
            ) from err

    def all_reduce(self, tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """``tensors`` summed (or averaged) over the ranks with one all-reduce."""
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
        buffer = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        self._wait(dist.all_reduce(buffer, group=self.group, async_op=True), what)
        self.num_collectives += 1
        if self.reduce == "mean":
            buffer = buffer / self.world_size
        parts = torch.split(buffer, [t.numel() for t in tensors])
        return [p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, tensors, strict=True)]

    def all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on every rank), in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        work = dist.all_gather(parts, tensor.contiguous(), group=self.group, async_op=True)
        self._wait(work, what)
        self.num_collectives += 1
        return parts

    def check_params(self, params: PyTree, who: str) -> None:
        """On the first call only: all ranks' params must have the same structure, shapes,
        dtypes and device type (one all-gather of an 8-byte digest; the full descriptions
        are gathered only to name a mismatch)."""
        if self.checked:
            return
        mine = metadata_of(params)
        device = next(iter(optree.tree_leaves(params)), torch.empty(0)).device
        if dist.get_backend(self.group) == "gloo":
            device = torch.device("cpu")
        digest = torch.tensor([_digest(mine)], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(digest) for _ in range(self.world_size)]
        self._wait(
            dist.all_gather(gathered, digest, group=self.group, async_op=True), "params metadata"
        )
        self.checked = True
        if all(bool(g == digest) for g in gathered):
            return
        described: list[Any] = [None] * self.world_size
        dist.all_gather_object(described, mine, group=self.group)
        lines = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(described))
        raise DistributedOracleError(
            f"{who}: the ranks' params differ in structure, shape, dtype or device type; "
            f"every rank must hold the same replicated params (only the data is sharded):\n{lines}"
        )
