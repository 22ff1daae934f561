"""FedRolex (Alam, Liu, Yan and Zhang, "FedRolex: Model-Heterogeneous Federated Learning with Rolling
Sub-Model Extraction", NeurIPS 2022).

HeteroFL with a rolling window instead of a fixed prefix: in global round t, a unit group with K
units and a client of keep ratio r keeps the units {(t + i) mod K : i < ceil(r * K)}. The window
start advances by one unit per round and wraps around, so over K rounds every unit is trained by
clients of every size; round 0 equals HeteroFL. The round is global, so all clients of a round use
windows with the same start. Everything else (physically smaller local model, scaler, static BN,
masked cross-entropy, count-normalised label-split aggregation) is HeteroFL's (baselines/heterofl.py).

Difference from the official code (AIoT-MLSys-Lab/FedRolex), following METHODS.md: the official
server takes the first ceil(r * K) entries of torch.roll(arange(K), t), i.e. the window starts at
(K - t) mod K and moves backwards; here it starts at t mod K and moves forwards. Both visit every
unit equally often.
"""
from __future__ import annotations

from baselines.heterofl import HeteroFL
from harness.submodel import IndexSets, rolling_index_sets


class FedRolex(HeteroFL):
    title = "FedRolex"

    def index_sets(self, rnd: int, widths: dict[str, int]) -> IndexSets:
        """A window of `widths[g]` consecutive units of every group, starting at the global round."""
        return rolling_index_sets(self.bench.full_widths, widths, start=rnd)
