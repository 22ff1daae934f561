"""Baseline methods: FedAvg, HeteroFL, FedRolex, PruneFL."""
