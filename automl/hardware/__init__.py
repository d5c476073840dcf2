"""Hardware cost: energy models now; measured latency/energy profiles and the predictor build on them."""
