"""Sampling outside the engine: the reference tree sampler, plain generation, prompt rules, evaluation."""
