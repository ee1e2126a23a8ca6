"""Training: the Trainer loop, batch preparation, the minibatch plan, metrics."""
