"""The policy forward: the LM head, packed log-probs, fp32 master weights, DDP/FSDP2 wrapping."""
