"""FedAvg (McMahan et al., AISTATS 2017), the reference method.

Every sampled client trains the dense global model (device caps are ignored, as in the FedLPS
authors' code); the server takes the sample-weighted mean of the client models.
"""
from __future__ import annotations

from harness.cost import training_flops
from harness.records import ClientResult, ClientTask
from harness.strategy import Client, Strategy
from harness.submodel import Contribution, aggregate, state_bytes
from harness.training import LocalJob


class FedAvgClient(Client):
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        return self.bench.job(task, global_state, clip_grad_norm=self.params.clip_grad_norm)

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        trained = {k: v.cpu() for k, v in job.trained.items() if k in global_state}
        size = state_bytes(trained)
        return ClientResult(
            task.client_id, task.round, payload=trained, num_samples=len(job.y), train_loss=job.stats.loss,
            train_acc=job.stats.accuracy, keep_ratio=1.0,
            flops=training_flops(self.bench.flops.forward(), job.stats.samples), bytes_up=size, bytes_down=size)


class FedAvg(Strategy):
    Client = FedAvgClient
    title = "FedAvg"

    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    def configure(self, rnd, clients):
        return self.global_state, [None] * len(clients)

    def aggregate(self, rnd, kept, dropped):
        """Dropped clients' updates are lost; they change nothing."""
        contributions = [Contribution(r.payload, weight=r.num_samples) for r in kept]
        self.global_state = aggregate(self.global_state, self.bench.layout, contributions)
        return {}

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state)

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
