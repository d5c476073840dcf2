"""Hardware cost: per-layer latency profiles measured on a device (layers, measure, profile), the
predictor fitted on whole models (predict), its validation (validate) and the modelled energy (energy)."""
