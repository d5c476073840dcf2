"""Early exit: the multi-exit model and threshold calibration (model), the registered ``exits`` method
(method), splitting a user's forward at named modules (split) and the deployed segment graphs (export)."""
