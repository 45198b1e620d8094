"""Pure math: graphs, mixing weights, robust aggregation, push-sum, outer optimizers. No I/O."""
