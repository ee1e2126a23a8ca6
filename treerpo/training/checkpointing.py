"""The Trainer's run state on disk: resume from the latest checkpoint, save one (single-process or DCP), stop on a
signal with a checkpoint, and refuse to go on (or to save) once training diverged."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from treerpo.models.tiny import load_model_and_tokenizer
from treerpo.policy.parallel import local_tensor, reshard_all
from treerpo.runtime.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from treerpo.runtime.finite_guard import NonFiniteError, all_finite, check_weights_finite, restart_advice
from treerpo.runtime.graceful_stop import TrainingInterrupted
from treerpo.runtime.resume import ResumeMismatchError, check_resumable, comparable_config

MASTER_WEIGHTS = "master_weights.pt"  # fp32 master weights of a half-precision run
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PeftModel.save_pretrained writes


class Checkpointing:
    """Mixed into ``Trainer``: reads and writes the state its loop keeps (model, optimizer, master weights, counters,
    the held-out accuracy before training, the non-finite streak)."""

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            self.log(f"resume: no checkpoint in {self.out}, starting from step 0")
            return
        state = load_trainer_state(checkpoint)
        check_resumable(comparable_config(self.config), state["config"], checkpoint)
        if state.get("dtype", "torch.float32") != str(self.dtype):
            raise ResumeMismatchError(
                f"resume: {checkpoint} was trained in {state.get('dtype', 'torch.float32')} "
                f"but this run resolves --dtype to {self.dtype}; pass --dtype "
                f"{state.get('dtype', 'torch.float32').removeprefix('torch.')}"
            )
        if self.policy is not None:
            self._resume_distributed(checkpoint, state)
        else:
            self._load_weights(checkpoint)
            self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
            if self.master is not None:
                self.master.load_state_dict(torch.load(checkpoint / MASTER_WEIGHTS, weights_only=True))
        self.start_step = state["step"]
        self.elapsed_before = state["wall_time_s"]
        self.initial_eval = state["initial_eval_accuracy"]
        self.counters = state["counters"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.sampler.on_weights_updated()
        self.log(f"resumed from {checkpoint} at step {self.start_step}")

    def _load_weights(self, checkpoint: Path) -> None:
        """The model's weights, or with a LoRA adapter the adapter's (the base weights never change)."""
        if self.adapter is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.adapter, load_file(checkpoint / ADAPTER_WEIGHTS))
            return
        loaded, _ = load_model_and_tokenizer(checkpoint)
        self.model.load_state_dict(loaded.state_dict())

    def _resume_distributed(self, checkpoint: Path, state: dict) -> None:
        from treerpo.runtime.distributed_checkpoint import load_distributed_state

        saved_world = state.get("world_size", 1)
        if saved_world != self.world.size:
            self.log(
                f"resume: {checkpoint} was written by {saved_world} ranks and this run has {self.world.size}; "
                "the weights and optimizer state are resharded exactly, but the steps from here on are not "
                "bit-identical to a run that kept the old world size (reductions add in another order)"
            )
        load_distributed_state(checkpoint, self.policy, self.optimizer, self.world)

    def _raise_if_diverged(self, done: int) -> None:
        if self.nonfinite_streak >= self.config.max_nonfinite_steps:
            latest = latest_checkpoint(self.out)
            raise NonFiniteError(
                f"steps {done - self.nonfinite_streak + 1}-{done}: the loss or gradient norm was not finite "
                f"{self.nonfinite_streak} steps in a row (max_nonfinite_steps={self.config.max_nonfinite_steps}); "
                f"their updates were not applied. {restart_advice(self.config, latest)}"
            )

    def _trainer_state(self) -> dict:
        wall = self.elapsed_before + time.perf_counter() - self.started
        return {
            "config": comparable_config(self.config),
            "wall_time_s": wall,
            "counters": self.counters,
            "initial_eval_accuracy": self.initial_eval,
            "nonfinite_streak": self.nonfinite_streak,
            "dtype": str(self.dtype),
            "world_size": self.world.size,
        }

    def save(self, done: int) -> Path:
        advice = restart_advice(self.config, latest_checkpoint(self.out))
        if self.policy is not None:
            from treerpo.runtime.distributed_checkpoint import save_distributed_checkpoint

            reshard_all(self.policy)
            if self.world.min([all_finite(local_tensor(p.detach()) for p in self.policy.parameters())])[0] == 0:
                raise NonFiniteError(
                    f"the model's weights are not finite after step {done}; no checkpoint was written. {advice}"
                )
            return save_distributed_checkpoint(
                self.world,
                self.out,
                done,
                self.policy,
                self.optimizer,
                self.model,
                self.tokenizer,
                self._trainer_state(),
                keep=self.config.keep_checkpoints,
                export_dtype=self.dtype,
            )
        check_weights_finite(self.model, f"after step {done}", advice)
        extra = {MASTER_WEIGHTS: self.master.state_dict()} if self.master is not None else {}
        return save_checkpoint(
            self.out,
            done,
            self.adapter if self.adapter is not None else self.model,  # a PeftModel saves its adapter only
            self.tokenizer,
            self.optimizer,
            self._trainer_state(),
            keep=self.config.keep_checkpoints,
            extra=extra,
        )

    def _stop_on_signal(self, signum: int, done: int) -> None:
        latest = latest_checkpoint(self.out)
        if latest is None or load_trainer_state(latest)["step"] != done:
            latest = self.save(done)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"{name}: stopped after step {done} of {self.config.max_steps}; checkpoint "
            f"{latest}; continue with the same options plus --resume",
            signum,
        )
