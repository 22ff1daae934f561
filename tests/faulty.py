"""A test-only strategy, loaded by import path (method.name: tests.faulty:FailingFedAvg)."""

from baselines.fedavg import FedAvg
from harness.strategy import MethodParams


class FailingParams(MethodParams):
    fail_clients: list[int] = []


class FailingFedAvg(FedAvg):
    """FedAvg whose listed clients raise in local training."""

    Params = FailingParams

    def local_job(self, global_state, task):
        if task.client_id in self.params.fail_clients:
            raise RuntimeError(f"client {task.client_id} broke on purpose")
        return super().local_job(global_state, task)


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
