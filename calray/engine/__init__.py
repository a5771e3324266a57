"""The one training loop, its optimisers and schedules, evaluation, checkpoints and run files."""
