"""Registers the treerpo rollout, agent loop and trainer with verl: name this module in
``VERL_USE_EXTERNAL_MODULES`` (verl imports it in every one of its processes, from its own ``__init__``, so what
this module imports must not import the rollout module back: the rollout and agent loop are registered by name)."""

from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.replica import RolloutReplicaRegistry

from treerpo.integrations.verl import AGENT_LOOP, ROLLOUT_NAME
from treerpo.integrations.verl import trainer as _trainer  # noqa: F401  (registers TreeRPOTrainer)

rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "treerpo.integrations.verl.rollout.TreeServerAdapter"
_agent_loop_registry[AGENT_LOOP] = {"_target_": "treerpo.integrations.verl.agent_loop.TreeAgentLoop"}


def _replica():
    from treerpo.integrations.verl.rollout import TreeReplica

    return TreeReplica


RolloutReplicaRegistry.register(ROLLOUT_NAME, _replica)
