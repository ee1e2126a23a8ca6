"""treerpo inside verl's PPO trainer: tree rollouts sampled by treerpo's engine and TreeRPO's per-token advantages.

Pieces (importing this package imports no verl; ``plugin`` registers the rest with verl):
  ``leaf_rows``      a tree's leaves as verl samples: each leaf's path as one response, and the tree's shape in its
                     ``extra_fields`` (``treerpo_tree``), so the trainer can rebuild the tree;
  ``advantages``     the trainer side: trees rebuilt from a batch's samples and their rewards, TreeRPO's node values
                     and sibling-group advantages, and each sample's per-token advantages (``flatten_trees``);
  ``rollout``        the rollout replica, server and adapter (``actor_rollout_ref.rollout.name=treerpo``): the server
                     samples one tree per prompt with ``TreeSampler`` on the actor's weights (``update_weights``,
                     cached K/V retired on every update) and answers each of the prompt's ``rollout.n`` requests with
                     one leaf;
  ``agent_loop``     ``treerpo_tree``: the single-turn agent loop telling the server which prompt and leaf it asks for;
  ``trainer``        ``trainer.v1.trainer_mode=treerpo``: verl's synchronous PPO trainer with
                     ``algorithm.adv_estimator=treerpo`` computing the advantages above (any other estimator, e.g.
                     ``grpo``, is verl's own);
  ``plugin``         the module to name in ``VERL_USE_EXTERNAL_MODULES``.
"""

ROLLOUT_NAME = "treerpo"  # actor_rollout_ref.rollout.name
AGENT_LOOP = "treerpo_tree"  # actor_rollout_ref.rollout.agent.default_agent_loop
TRAINER_MODE = "treerpo"  # trainer.v1.trainer_mode, and algorithm.adv_estimator
