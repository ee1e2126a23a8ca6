"""Run control: checkpoints, resume, the run lock, graceful stop, the finite guard, distributed set-up."""
