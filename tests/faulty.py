"""A test-only strategy, loaded by import path (method.name: tests.faulty:FailingFedAvg)."""

from baselines.fedavg import FedAvg, FedAvgClient
from harness.strategy import Client, MethodParams, Strategy


class FailingParams(MethodParams):
    fail_clients: list[int] = []


class FailingClient(FedAvgClient):
    def local_job(self, global_state, task):
        if task.client_id in self.params.fail_clients:
            raise RuntimeError(f"client {task.client_id} broke on purpose")
        return super().local_job(global_state, task)


class FailingFedAvg(FedAvg):
    """FedAvg whose listed clients raise in local training."""

    Client = FailingClient
    Params = FailingParams


class CrashOnceParams(MethodParams):
    crash_at_round: int = 2
    marker: str = ""


class CrashOnceFedAvg(FedAvg):
    """FedAvg whose server process dies once at `crash_at_round` (the marker file remembers it)."""

    Params = CrashOnceParams

    def aggregate(self, rnd, kept, dropped):
        from pathlib import Path

        marker = Path(self.params.marker)
        if rnd == self.params.crash_at_round and not marker.exists():
            marker.write_text("crashed")
            raise RuntimeError("the trial's driver dies here, once")
        return super().aggregate(rnd, kept, dropped)


class InstantClient(Client):
    def local_job(self, broadcast, task):
        import torch

        from harness.training import LocalJob

        empty = torch.zeros(0)
        return LocalJob(self.bench.spec(), {}, empty, empty, self.bench.cfg.train, 0.0, torch.Generator())

    def local_result(self, broadcast, task, job):
        from harness.records import ClientResult

        return ClientResult(task.client_id, task.round, num_samples=1, train_loss=0.5, train_acc=0.5, flops=1.0,
                            bytes_up=1, bytes_down=1)


class Instant(Strategy):
    """No training at all: every client returns at once (for tests of the round loop's bookkeeping)."""

    Client = InstantClient

    def configure(self, rnd, clients):
        return None, [None] * len(clients)

    def aggregate(self, rnd, kept, dropped):
        return {}

    def evaluate(self, rnd):
        import numpy as np

        from harness.records import Evaluation

        acc = np.full(len(self.bench.clients.eval_ids), 0.5)
        return Evaluation(clients={"mirrored": acc, "authors": acc}, acc_global=0.5)


class Hostile:
    """Unpickling this writes a file: stands for code that a pickle runs when it is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SlowParams(MethodParams):
    round_s: float = 1.0
    until: str = ""


class SlowFedAvg(FedAvg):
    """FedAvg whose server takes `round_s` seconds more per round (the same numbers, slower) until the
    file `until` exists (always, when empty): leaves time to kill a node in the middle of a run, and
    no more."""

    Params = SlowParams

    def aggregate(self, rnd, kept, dropped):
        import os
        import time

        if not (self.params.until and os.path.exists(self.params.until)):
            time.sleep(self.params.round_s)
        return super().aggregate(rnd, kept, dropped)


class BuggyParams(MethodParams):
    bug_round: int = 1


class BuggyClient(FedAvgClient):
    def local_job(self, global_state, task):
        if task.round >= self.params.bug_round:
            return len(task.client_id, "a bug on purpose")  # TypeError: len() takes exactly one argument
        return super().local_job(global_state, task)


class BuggyFedAvg(FedAvg):
    """FedAvg whose client code has a bug that shows from `bug_round` on (a TypeError)."""

    Client = BuggyClient
    Params = BuggyParams
