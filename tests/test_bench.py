"""`fedbench bench` end to end on tiny workloads: the JSON fields README and `make scale` read, and the
plain PyTorch loop training exactly what fedbench trains."""
import json

from harness.cli import main


def bench_json(capsys, *args: str) -> dict:
    assert main(["bench", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_mnist_bench_against_its_plain_loop(ray_session, capsys):
    r = bench_json(capsys, "--clients", "20", "--clients-per-round", "4", "--rounds", "2", "--executors", "1")
    assert r["plain_same_training"] is True and r["plain_max_abs_diff"] == 0.0
    for key in ("serial_s_per_round", "batched_s_per_round", "limit_s_per_round", "ray_s_per_round",
                "plain_s_per_round"):
        assert r[key] > 0, key
    # The ratio is taken before the times are rounded to 4 decimals: it lies within the rounded times' bounds.
    ray, plain, half = r["ray_s_per_round"], r["plain_s_per_round"], 0.5e-4
    assert (ray - half) / (plain + half) - 0.5e-3 <= r["ray_vs_plain"] <= (ray + half) / (plain - half) + 0.5e-3


def test_the_scale_bench_on_a_million_clients(ray_session, capsys):
    r = bench_json(capsys, "--workload", "synthetic", "--method", "fedlps", "--clients", "1000000",
                   "--clients-per-round", "5", "--rounds", "2", "--executors", "1")
    assert (r["clients"], r["method"], r["rounds"]) == (1_000_000, "fedlps", 2)
    assert 0 < r["train_s_median"] < r["round_s_median"] and 0 < r["overhead_fraction"] < 1
    assert r["peak_pss_mb"] > 0 and r["startup_s"] > 0 and 0 <= r["final_acc"] <= 1


def test_the_readme_scale_table_is_the_committed_jsons():
    from pathlib import Path

    from harness.bench import scale_table

    repo = Path(__file__).resolve().parents[1]
    command = "python -m harness.bench table results/scale"
    readme = (repo / "README.md").read_text()
    start = readme.index(f"<!-- table: {command} -->\n") + len(f"<!-- table: {command} -->\n")
    assert readme[start:readme.index("<!-- /table -->", start)] == scale_table(repo / "results/scale") + "\n", \
        f"README's scale table differs from `{command}`: rerun it and paste"


def test_the_plain_loop_trains_fedprox_as_fedbench_does():
    """The plain loop with FedProx's proximal term (mu 1: a term that moves the weights by ~0.1 in
    one epoch) against fedbench's rule path on one round's clients, both in this process: equal up to
    float32 rounding (the two write the loss in different orders)."""
    import pickle
    from types import SimpleNamespace

    from harness import bench as B
    from harness.transport import pack, unpack
    from harness.workbench import Workbench

    cfg = B.workload(20, 4, 1, 1.0, method="fedprox")
    cfg = cfg.model_copy(update={"method": cfg.method.model_copy(update={"mu": 1.0})})
    B._init_plain(cfg.model_dump_json(), 1)
    B._init_limit(cfg.model_dump_json(), 1)
    bench = Workbench(cfg)
    _, broadcast, tasks = next(B._rounds(bench, 1))
    ours = unpack(B._limit_chunk(pack((broadcast, tasks))))
    pool = SimpleNamespace(run=lambda b, t: pickle.loads(B._plain_chunk(pickle.dumps((b, t)))))
    plain = B._PlainRun(pool, list(bench.param_shapes))(broadcast, tasks)
    same = B._SameTraining(0, 1)
    same([ours, plain])
    assert [r.client_id for r in plain] == [t.client_id for t in tasks]
    assert 0 < same.max_abs_diff < 1e-5  # without the term in the plain loop: 0.09
