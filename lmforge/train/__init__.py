"""Pretraining: optimizers, schedules, the one Trainer, checkpoints, metrics, the main job."""
