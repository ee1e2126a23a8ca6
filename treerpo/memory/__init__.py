"""Memory planning: what a training run holds on each rank, estimated from the model's config before any weight
is loaded (``python -m treerpo.plan``)."""
