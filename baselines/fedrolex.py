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

Variant `reference`: the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `FedRolex.py`), on top of HeteroFL's reference variant
(widths, no scaler, plain cross-entropy, batch-statistics BN, momentum 0, clipping at 5). Its quirks:
- the window is the client's own: s = the number of rounds the client was sampled before
  (`Client_Rolex.selected_num`), not the global round; it moves backwards as torch.roll does:
  {(K - s + i) mod K : i < k} (`roll_split_model`);
- every narrowed tensor axis rolls by s with its own size, so the CNN's fc1 input columns (conv2's
  20 channels x 16 positions = 320) roll by s columns, not by 16 s: for s > 0 they no longer line up
  with conv2's kept channels (`AxisIndex` entries give those columns directly);
- 1-D tensors (biases, BN weights) are averaged with weights from counters kept since round 0: a
  counter per coordinate starts at 1 and grows by one for every client that held the coordinate;
  because the code's `combine` rebinds its counters to the copy it increments, a client reads the
  counters as updated by the clients before it in the same round (`combine`, `tmp_counts`). Clients
  are taken in client-id order (the code: in sampling order).
"""
from __future__ import annotations

import torch

from baselines.heterofl import HeteroFL, HeteroFLClient
from harness.submodel import AxisIndex, Contribution, IndexSets, rolling_index_sets


class FedRolexClient(HeteroFLClient):
    def index_sets(self, task, widths: dict[str, int]) -> tuple[IndexSets, AxisIndex | None]:
        """A window of `widths[g]` consecutive units of every group: starting at the global round, or
        (reference) ending before the client's own selection count and rolling backwards."""
        full = self.bench.full_widths
        if not self.reference:
            return rolling_index_sets(full, widths, start=task.round), None
        shift = task.instruction["shift"]
        index_sets = rolling_index_sets(full, widths, start=-shift)
        # Reference quirk: a flattened input rolls by `shift` columns of its own size.
        axis_index = {}
        for name, dims in self.bench.layout.items():
            for axis, dim in enumerate(dims):
                if dim.repeat > 1 and widths.get(dim.group, 0) < full.get(dim.group, 0):
                    size, kept = dim.repeat * full[dim.group], dim.repeat * widths[dim.group]
                    axis_index[(name, axis)] = torch.sort((-shift + torch.arange(kept)) % size).values
        return index_sets, axis_index


class FedRolex(HeteroFL):
    Client = FedRolexClient
    title = "FedRolex"

    def setup(self, store):
        super().setup(store)
        # reference variant: each selected client's selection count s (absent: 0), and per 1-D tensor a
        # counter per coordinate
        self.selections: dict[int, int] = {}
        self.counters = ({k: torch.ones_like(v) for k, v in self.global_state.items() if v.dim() == 1}
                         if self.reference else {})

    def configure(self, rnd, clients):
        if not self.reference:
            return super().configure(rnd, clients)
        shifts = [{"shift": self.selections.get(s.client_id, 0)} for s in clients]
        for s in clients:
            self.selections[s.client_id] = self.selections.get(s.client_id, 0) + 1
        return self.global_state, shifts

    def contributions(self, kept) -> list[Contribution]:
        contributions = super().contributions(kept)
        if not self.reference:
            return contributions
        # Reference quirk: 1-D tensors weighted by the live counters (see the module docstring).
        for c in contributions:
            for name, counter in self.counters.items():
                idx = c.index_sets.get(self.bench.layout[name][0].group) if name in self.bench.layout else None
                region = idx if idx is not None else slice(None)
                c.coordinate_weights[name] = counter[region].clone()
                counter[region] += 1
        return contributions

    def state_dict(self):
        return {**super().state_dict(), "selections": dict(self.selections),
                "counters": {k: v.clone() for k, v in self.counters.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        counts = state["selections"]  # a list over all clients in checkpoints before the dict
        self.selections = {int(c): int(n) for c, n in (counts.items() if isinstance(counts, dict) else enumerate(counts))
                           if n}
        self.counters = {k: v.clone() for k, v in state["counters"].items()}
