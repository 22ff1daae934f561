"""How client work travels between processes (harness/transport.py), and the bench's plain loop that
the client path is measured against."""
import pickle

import torch

from harness import bench
from harness.engine import SerialEngine
from harness.records import ClientResult
from harness.training import threads
from harness.transport import pack, unpack
from harness.workbench import Workbench


def test_tensors_arrive_exactly_and_the_rest_as_pickled():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    value = {"w": weights, "again": weights, "view": weights[1:], "t": weights.t(), "scalar": torch.tensor(3),
             "empty": torch.zeros(0, 2), "mask": torch.rand(5, generator=gen) > 0.5,
             "param": torch.nn.Parameter(torch.ones(2)), "bf16": torch.ones(2, dtype=torch.bfloat16),
             "result": ClientResult(3, 1, payload={"x": torch.arange(4.0)}, num_samples=7),
             "fn": lambda x: x + 1}
    got = unpack(pack(value))
    for key in ("w", "view", "t", "scalar", "empty", "mask", "param", "bf16"):
        a, b = value[key], got[key]
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b), key
    assert got["again"] is got["w"]  # one object stays one object
    assert got["w"].data_ptr() % 64 == 0  # in torch's own (aligned) allocation
    got["w"].add_(1)  # writable, and its own memory
    assert not torch.equal(got["w"], weights)
    assert torch.equal(got["result"].payload["x"], torch.arange(4.0)) and got["result"].num_samples == 7
    assert got["fn"](1) == 2


def test_the_bench_plain_loop_trains_as_fedbench_bit_for_bit():
    cfg = bench.workload(20, 4, 2, 1.0)
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"backend": "serial"})})
    work = Workbench(cfg)
    serial = SerialEngine(cfg.engine)
    serial.start(work)
    with threads(1):  # as the serial engine trains (engine.cpus_per_executor 1)
        _plain_rounds(work, serial)


def _plain_rounds(work, serial):
    bench._init_plain(work.cfg.model_dump_json(), 1)
    try:
        names = list(work.param_shapes)
        rounds = bench._rounds(work, 1)
        _, broadcast, tasks = next(rounds)
        for _ in range(2):
            ours = serial.run(broadcast, tasks)
            plain = pickle.loads(bench._plain_chunk(pack(({n: broadcast[n].numpy() for n in names}, tasks))))
            assert [r.client_id for r in ours] == [c for c, _, _ in plain]
            for result, (_, samples, arrays) in zip(ours, plain):
                assert result.num_samples == samples
                for name, array in zip(names, arrays):
                    assert torch.equal(result.payload[name], torch.from_numpy(array)), name
                    assert not torch.equal(result.payload[name], broadcast[name])  # it trained
            try:
                _, broadcast, tasks = rounds.send(ours)
            except StopIteration:
                break
    finally:
        bench._worker.clear()
