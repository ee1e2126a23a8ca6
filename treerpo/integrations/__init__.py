"""treerpo inside other RL frameworks (``treerpo.integrations.trl``: TRL's GRPOTrainer)."""
