"""fedbench's engine: configuration, data, models, cost model, client execution, round loop, results."""
