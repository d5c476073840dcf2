"""Knowledge distillation: the loss and hint layers (loss), the registered ``kd`` method (method) and
how a teacher is found, trained once and cached (teacher)."""
