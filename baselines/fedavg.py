"""FedAvg (McMahan et al., AISTATS 2017), the reference method.

Every sampled client trains the dense global model (device caps are ignored, as in the FedLPS
authors' code); the server takes the sample-weighted mean of the client models.
"""
from __future__ import annotations

from harness.batched import BatchedLocalSGD, LocalJob
from harness.cost import training_flops
from harness.strategy import ClientResult, ClientTask, Strategy
from harness.submodel import Contribution, aggregate, state_bytes


class FedAvg(BatchedLocalSGD, Strategy):
    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    def configure(self, rnd, clients):
        return self.global_state, [None] * len(clients)

    # local_update = local_job, then local_sgd, then local_result (harness.batched.BatchedLocalSGD)
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        bench = self.bench
        model = bench.load(bench.build(), global_state)
        x, y = bench.train_data(task.client_id)
        return LocalJob(model, x, y, bench.cfg.train, bench.lr(task.round),
                        bench.generator(task.round, task.client_id), clip_grad_norm=self.params.clip_grad_norm)

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        bench, stats, y = self.bench, job.stats, job.y
        trained = {k: v.detach().cpu() for k, v in job.model.state_dict().items() if k in global_state}
        size = state_bytes(trained)
        return ClientResult(
            task.client_id, task.round, payload=trained, num_samples=len(y), train_loss=stats.loss,
            train_acc=stats.accuracy, keep_ratio=1.0,
            flops=training_flops(bench.flops.forward(), stats.samples), bytes_up=size, bytes_down=size)

    def aggregate(self, rnd, results):
        contributions = [Contribution(r.payload, weight=r.num_samples) for r in results]
        self.global_state = aggregate(self.global_state, self.bench.layout, contributions)
        return {}

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state)

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
