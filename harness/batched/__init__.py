"""Batched client execution: the clients of a call that share one model shape train as one program.

The clients' parameters are stacked along a new leading dimension and one step of
`torch.func.vmap(torch.func.grad(...))` over `torch.func.functional_call` trains all of them, by the
rule of harness/training.py (`minibatches`, `clip_coefficient`, `sgd_directions`), so each client
gets exactly what training it alone gives:

- data order: each client draws its minibatches from its own generator, the same draws in the same
  order (`schedule.py`);
- number of steps: a client with fewer steps stops updating (an `active` flag freezes its
  parameters, statistics and accumulators) while the others go on;
- partial last batches: every minibatch is padded to the batch size and carries per-sample weights
  (1 real, 0 padding); the loss is the weighted mean over the real samples and batch normalisation
  takes its statistics over the real samples only (`norm.py`);
- per client: class masks, unit masks, update masks, weight masks with importance, the scaler and
  the norm kind (BN running statistics included);
- loss and accuracy are summed on the device and read once per group.

Results equal the one-by-one path's within float rounding (in float64 the two agree to ~1e-13,
tests/test_batched.py).

Modules: `groups.py` (which jobs train together, and the fallback to one by one), `schedule.py` (the
minibatches of stacked clients), `norm.py` (sample-weighted batch normalisation), `program.py` (the
stacked tensors and the batched step), `graphs.py` (the step captured as a CUDA graph, per executor).
"""
from harness.batched.graphs import GraphCache
from harness.batched.groups import group_key, train_jobs

__all__ = ["GraphCache", "group_key", "train_jobs"]
