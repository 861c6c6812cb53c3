"""The model side of a training step: the embedder, its tokenizer, the loss, GradCache and the optimizer."""
