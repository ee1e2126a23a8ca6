"""The treerpo rollout inside verl: a server that samples one tree per prompt, its replica, and the trainer-side
adapter that hands it the actor's weights.

verl asks for ``rollout.n`` samples of each prompt, one ``generate`` call each. The ``treerpo_tree`` agent loop
(``agent_loop.py``) sends them all to one server with the prompt's ``uid`` as ``tree_key`` and the sample's
``session_id`` as ``leaf_index``; the first call samples the prompt's tree (``TreeSampler``: siblings share their
prefix's K/V), every call returns one leaf's path (tokens and the sampler's log-probs) and the tree's shape in
``extra_fields["treerpo_tree"]``. A tree that ended early has fewer leaves than ``rollout.n``: the calls past its
leaves get its first leaf again, marked as no leaf (advantage 0). Weights: verl gives the adapter every parameter
(``update_weights``); the leader of each replica sends them to its server, which loads them and retires its
cached K/V and trees.

Options, under ``actor_rollout_ref.rollout.engine_kwargs.treerpo``: ``branching`` (list, product = rollout.n),
``segment_tokens``, ``kv_pool_tokens``, ``device`` (default cuda when there is one), ``dtype``, ``num_gpus`` (the
server actor's share of a GPU).
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

from treerpo.integrations.verl import ROLLOUT_NAME as NAME
from treerpo.integrations.verl.advantages import FIELD, leaf_fields
from treerpo.tree import TreeSpec


def tree_options(config) -> dict:
    """The ``engine_kwargs.treerpo`` options, checked against ``rollout.n`` and ``response_length``."""
    opts = dict((config.engine_kwargs or {}).get(NAME) or {})
    if "branching" not in opts or "segment_tokens" not in opts:
        raise ValueError(
            "the treerpo rollout needs +actor_rollout_ref.rollout.engine_kwargs.treerpo.branching=[...] and "
            "+actor_rollout_ref.rollout.engine_kwargs.treerpo.segment_tokens=N"
        )
    spec = TreeSpec(tuple(opts["branching"]), int(opts["segment_tokens"]), max_prompt_tokens=int(config.prompt_length))
    if spec.max_leaves != int(config.n):
        raise ValueError(
            f"rollout.n={config.n} must equal the tree's leaves, the product of branching {list(spec.branching)} "
            f"= {spec.max_leaves}: each of a prompt's samples is one leaf"
        )
    if spec.max_new_tokens > int(config.response_length):
        raise ValueError(
            f"a leaf's path holds up to {spec.max_new_tokens} tokens (depth x segment_tokens) but "
            f"data.max_response_length is {config.response_length}: raise it, or shorten the tree"
        )
    return {**opts, "spec": spec}


class TreeServer:
    """One replica's sampler (a Ray actor): trees per prompt key, a leaf per request."""

    def __init__(self, config, model_config, replica_rank: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from treerpo.engine.tree_sampler import TreeSampler

        opts = tree_options(config)
        self.spec = opts["spec"]
        device = opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, opts.get("dtype", "float32"))
        path = model_config.get("local_path") or model_config.path  # a DictConfig here
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.sampler = TreeSampler(self.model, tokenizer, pool_tokens=int(opts.get("kv_pool_tokens", 1 << 16)))
        self.trees: dict[str, asyncio.Future] = {}
        self.lock = asyncio.Lock()
        self.global_steps = 0

    async def generate(self, prompt_ids, sampling_params, request_id, tree_key=None, leaf_index=0, **kwargs):
        if tree_key is None:
            raise ValueError("the treerpo rollout needs the treerpo_tree agent loop (rollout.agent.default_agent_loop)")
        if tree_key not in self.trees:
            self.trees[tree_key] = asyncio.ensure_future(self._sample(list(prompt_ids), sampling_params))
        tree = await self.trees[tree_key]
        leaves = [int(x) for x in tree.leaves() if x != 0]
        leaf = leaves[leaf_index] if leaf_index < len(leaves) else leaves[0]
        tokens = tree.path_token_ids(leaf, include_prompt=False).tolist()
        logprobs = np.concatenate(
            [tree.token_logprobs[tree.offsets[n] : tree.offsets[n + 1]] for n in tree.path(leaf)[1:]]
        )
        fields = leaf_fields(tree, leaf, tree_key) if leaf_index < len(leaves) else None
        return TokenOutput(
            token_ids=tokens,
            log_probs=logprobs.astype(float).tolist(),
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps, FIELD: fields},
        )

    async def _sample(self, prompt_ids: list[int], sampling_params: dict):
        spec = TreeSpec(
            self.spec.branching,
            self.spec.segment_tokens,
            max_prompt_tokens=self.spec.max_prompt_tokens,
            temperature=float(sampling_params.get("temperature", 1.0)),
            top_p=float(sampling_params.get("top_p", 1.0)),
        )
        async with self.lock:  # one engine: one tree at a time
            return (await asyncio.to_thread(self.sampler.sample, [prompt_ids], spec))[0]

    def load_weights(self, state_dict: dict, global_steps: int | None = None) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise ValueError(
                f"weights from the actor do not fit the server's model: missing {missing}, unexpected {unexpected}"
            )
        self.sampler.on_weights_updated()
        self.trees.clear()
        if global_steps is not None:
            self.global_steps = int(global_steps)

    def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = int(global_steps)

    async def _nothing(self, *args, **kwargs) -> None:
        """The replica's life-cycle calls: nothing to free or restore on this engine."""

    wake_up = sleep = abort_all_requests = resume_generation = _nothing
    clear_kv_cache = release_kv_cache = resume_kv_cache = start_profile = stop_profile = _nothing


def server_name(replica_rank: int) -> str:
    return f"{NAME}_server_{replica_rank}_0"


class TreeReplica(RolloutReplica):
    async def launch_servers(self):
        opts = tree_options(self.config)
        server = (
            ray.remote(TreeServer)
            .options(
                name=server_name(self.replica_rank),
                num_cpus=1,
                num_gpus=float(opts.get("num_gpus", 0)),
                max_concurrency=self.max_concurrency,
            )
            .remote(self.config, self.model_config, self.replica_rank)
        )
        self.servers = [server]
        self._server_handle = server
        self._server_address = server_name(self.replica_rank)


class TreeServerAdapter(BaseRollout):
    """In each trainer process: passes the actor's weights to the replica's server (its leader does)."""

    def __init__(self, config, model_config, device_mesh, *args, **kwargs):
        super().__init__(config, model_config, device_mesh, *args, **kwargs)
        size = 1
        for name in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"):
            size *= int(getattr(self.config, name, 1) or 1)
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank, self.leader = rank // size, rank % size == 0

    async def resume(self, tags: list[str]):
        pass

    async def release(self):
        pass

    async def update_weights(self, weights, **kwargs):
        # every rank walks the whole generator: gathering each full tensor is collective
        state = {}
        for name, tensor in weights:
            if self.leader:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.leader:
            server = ray.get_actor(server_name(self.replica_rank))
            await server.load_weights.remote(state, kwargs.get("global_steps"))
