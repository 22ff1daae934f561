"""The batched step captured as a CUDA graph, once per group shape, and replayed for every step.

Each executor owns one `GraphCache` (captured programs hold device memory pools of their own). The
per-step inputs are copied into the program's static tensors; nothing syncs with the CPU until the
group's results are read. If capturing fails, the cache turns itself off and groups run eagerly
(same results)."""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from harness.batched.program import StackedClients

log = logging.getLogger(__name__)


class GraphCache:
    def __init__(self, size: int = 16):
        self.size = size
        self.programs: OrderedDict[tuple, StackedClients] = OrderedDict()
        self.broken = False

    def program(self, key: tuple, rows: int, make) -> StackedClients | None:
        """A captured program for `key` with room for `rows` data rows, from the cache or captured now
        from `make(capacity)`; None when capturing fails."""
        if self.broken or not torch.cuda.is_available():
            return None
        program = self.programs.get(key)
        if program is not None and program.capacity >= rows:
            self.programs.move_to_end(key)
            return program
        self.programs.pop(key, None)
        try:
            program = make(max(rows, int(rows * 1.5)))  # room for larger rounds of the same shape
            program.active.zero_()  # warm-up and capture steps change nothing: every client is inactive
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    program.step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                program.step()
            program.graph = graph
        except Exception as e:  # noqa: BLE001 - eager execution gives the same results
            self.broken = True
            log.warning("CUDA graph capture failed (%s: %s); batched training runs eagerly", type(e).__name__, e)
            return None
        self.programs[key] = program
        while len(self.programs) > self.size:
            self.programs.popitem(last=False)
        return program
