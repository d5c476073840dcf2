"""Knowledge distillation: the loss and hint layers (loss) and the registered ``kd`` method (method). The
teacher is another recipe's model or a checkpoint, so finding, training and caching it is the recipe
layer's job (automl.recipe.teacher), handed to the method as ``ApplyContext.load_teacher``."""
