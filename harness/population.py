"""An experiment's data and clients, whichever kind: a data set held in memory and partitioned
(harness/data.py), or a population whose data is generated per client (harness/synthetic.py)."""
from __future__ import annotations

from harness.config import DataConfig, ExperimentConfig
from harness.data import Dataset, Partition, load_dataset, natural_partition, partition
from harness.errors import ConfigError
from harness.synthetic import SyntheticClients, SyntheticData


def load_data(cfg: DataConfig, seed: int) -> Dataset | SyntheticData:
    """The Dataset of `cfg`; for `synthetic`, the generator of every client's samples (from `seed`,
    the experiment's)."""
    if cfg.dataset == "synthetic":
        return SyntheticData(alpha=cfg.alpha, beta=cfg.beta, iid=cfg.iid, seed=seed)
    return load_dataset(cfg)


def client_population(cfg: ExperimentConfig, dataset: Dataset | SyntheticData) -> Partition | SyntheticClients:
    """The experiment's clients: a Partition of `dataset` (shards, Dirichlet, IID or the file's
    natural clients), or synthetic clients whose data is generated on demand. Both offer len(),
    clients[c], num_samples(c), classes(c), train_data(c), val_data(c), test_data(kind, c), eval_ids,
    eval_set(), training_batches() and mean_num_samples()."""
    if isinstance(dataset, SyntheticData):
        return SyntheticClients(dataset, cfg.clients.total, cfg.data.eval_clients, cfg.data.split.val_fraction)
    y_train, y_test = dataset.y_train.numpy(), dataset.y_test.numpy()
    split = cfg.data.split
    if split.kind == "natural":
        if not cfg.data.dataset.startswith("npz:"):
            raise ConfigError("data.split.kind", "natural needs an npz data set (npz:<path>) holding client_train "
                                                 "and client_test arrays")
        part = natural_partition(cfg.data.dataset[4:], y_train, y_test, split, cfg.clients.total, cfg.seed)
    else:
        part = partition(y_train, y_test, split, cfg.clients.total, cfg.seed)
    return part.with_dataset(dataset)
