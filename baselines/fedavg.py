"""FedAvg (McMahan et al., AISTATS 2017), the reference method.

Every sampled client trains the dense global model (device caps are ignored, as in the FedLPS
authors' code); the server takes the sample-weighted mean of the client models.
"""
from __future__ import annotations

from harness.cost import training_flops
from harness.strategy import ClientResult, ClientTask, Strategy
from harness.submodel import Contribution, aggregate, state_bytes
from harness.training import local_sgd


class FedAvg(Strategy):
    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    def configure(self, rnd, clients):
        return self.global_state, [None] * len(clients)

    def local_update(self, global_state, task: ClientTask) -> ClientResult:
        bench = self.bench
        model = bench.load(bench.build(), global_state)
        x, y = bench.train_data(task.client_id)
        stats = local_sgd(model, x, y, bench.cfg.train, bench.lr(task.round),
                          bench.generator(task.round, task.client_id), clip_grad_norm=self.params.clip_grad_norm)
        trained = {k: v.detach().cpu() for k, v in model.state_dict().items() if k in global_state}
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
