"""A test-only strategy, loaded by import path (method.name: tests.faulty:FailingFedAvg)."""
from pydantic import BaseModel, ConfigDict

from baselines.fedavg import FedAvg


class FailingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_clients: list[int] = []


class FailingFedAvg(FedAvg):
    """FedAvg whose listed clients raise in local training."""

    Params = FailingParams

    def local_update(self, global_state, task):
        if task.client_id in self.params.fail_clients:
            raise RuntimeError(f"client {task.client_id} broke on purpose")
        return super().local_update(global_state, task)
