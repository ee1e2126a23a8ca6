"""``treerpo_tree``: verl's single-turn agent loop, each of a prompt's samples asking the treerpo server for one leaf
of the prompt's tree (routed by the prompt's uid, so every leaf comes from the same server and tree)."""

from __future__ import annotations

from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop


class _LeafRequests:
    """The server manager, with every request naming the prompt's tree and the sample's leaf."""

    def __init__(self, manager, key: str, leaf: int):
        self.manager, self.key, self.leaf = manager, key, leaf

    async def generate(self, request_id, **kwargs):
        return await self.manager.generate(self.key, tree_key=self.key, leaf_index=self.leaf, **kwargs)

    def __getattr__(self, name):
        return getattr(self.manager, name)


class TreeAgentLoop(SingleTurnAgentLoop):
    async def run(self, sampling_params, **kwargs):
        if "uid" not in kwargs or "session_id" not in kwargs:
            raise ValueError(
                "the treerpo_tree agent loop needs verl's v1 trainer (samples keyed by uid and session_id)"
            )
        self.server_manager = _LeafRequests(self.server_manager, str(kwargs["uid"]), int(kwargs["session_id"]))
        return await super().run(sampling_params, **kwargs)
