"""Accuracy through lm-evaluation-harness: its tasks and metrics, the run's engine as the model."""
