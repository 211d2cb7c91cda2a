"""What processes of one run share: gathering values in rank order, agreeing on counts, skipping gradient sync.

A thin layer over accelerate, so the rest of the engine reads the same with one process or many.
"""

from __future__ import annotations

import contextlib

import torch


class Dist:
    """The run's processes as seen from one of them (`accelerator` is accelerate's `Accelerator`)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def size(self) -> int:
        return self.accelerator.num_processes

    def gather_strings(self, items: list[str]) -> list[str]:
        """Every process's list, concatenated in rank order."""
        if self.size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def gather_floats(self, values: torch.Tensor) -> torch.Tensor:
        """A 1-D tensor concatenated over processes in rank order; lengths may differ (dropped trajectories)."""
        if self.size == 1:
            return values.detach().float().cpu()
        from accelerate.utils import gather_object

        return torch.tensor(gather_object(values.detach().float().cpu().tolist()), dtype=torch.float32)

    def _gather_int(self, value: int) -> list[int]:
        return self.accelerator.gather(torch.tensor([int(value)], device=self.accelerator.device)).cpu().tolist()

    def sum_int(self, value: int) -> int:
        """The sum of an integer over processes (every process gets it)."""
        return int(value) if self.size == 1 else int(sum(self._gather_int(value)))

    def min_int(self, value: int) -> int:
        """The minimum of an integer over processes (every process gets it)."""
        return int(value) if self.size == 1 else int(min(self._gather_int(value)))

    def rank_offset(self, n_local: int) -> int:
        """Where this process's items start in a rank-ordered concatenation."""
        return 0 if self.size == 1 else int(sum(self._gather_int(n_local)[: self.rank]))

    def no_sync(self, modules: list[torch.nn.Module], sync: bool):
        """Skip DDP's gradient all-reduce unless `sync` (the last micro-batch of an accumulation group)."""
        stack = contextlib.ExitStack()
        if not sync and self.size > 1:
            for module in modules:
                stack.enter_context(self.accelerator.no_sync(module))
        return stack
