"""The verl integration refuses settings it cannot honour before any work, naming the setting and the way out."""

import pytest

pytest.importorskip("verl", reason="verl is not installed here (bash run.sh test runs it in .venv-verl)")

from omegaconf import OmegaConf

from treerpo.integrations.verl.rollout import tree_options
from treerpo.integrations.verl.trainer import check_config


def _rollout(**overrides):
    base = dict(
        n=4, prompt_length=16, response_length=16, engine_kwargs={"treerpo": {"branching": [2, 2], "segment_tokens": 4}}
    )
    return OmegaConf.create({**base, **overrides})


def test_tree_options_accept_a_fitting_tree_and_refuse_the_rest():
    assert tree_options(_rollout())["spec"].max_leaves == 4
    with pytest.raises(ValueError, match=r"rollout.n=8 must equal the tree's leaves"):
        tree_options(_rollout(n=8))
    with pytest.raises(ValueError, match="data.max_response_length is 6: raise it"):
        tree_options(_rollout(response_length=6))
    with pytest.raises(ValueError, match=r"engine_kwargs.treerpo.branching"):
        tree_options(_rollout(engine_kwargs={}))


def _config(**actor):
    actor = {"ppo_mini_batch_size": 2, "loss_agg_mode": "token-mean", "use_kl_loss": False, **actor}
    return OmegaConf.create(
        {
            "algorithm": {"adv_estimator": "treerpo", "use_kl_in_reward": False},
            "data": {"train_batch_size": 2},
            "actor_rollout_ref": {"actor": actor},
        }
    )


def test_trainer_refuses_what_breaks_the_loss_equality():
    check_config(_config())
    with pytest.raises(ValueError, match="ppo_mini_batch_size=1 must equal data.train_batch_size=2"):
        check_config(_config(ppo_mini_batch_size=1))
    with pytest.raises(ValueError, match="loss_agg_mode=seq-mean-token-mean must be token-mean"):
        check_config(_config(loss_agg_mode="seq-mean-token-mean"))
    with pytest.raises(ValueError, match="use_kl_loss must be False"):
        check_config(_config(use_kl_loss=True))
    corrected = _config()
    corrected.algorithm.rollout_correction = {"rollout_is": "token", "rollout_rs": None}
    with pytest.raises(ValueError, match="rollout_correction.rollout_is must be null"):
        check_config(corrected)
    grpo = _config(ppo_mini_batch_size=1)
    grpo.algorithm.adv_estimator = "grpo"
    check_config(grpo)  # verl's own estimators: nothing to refuse
