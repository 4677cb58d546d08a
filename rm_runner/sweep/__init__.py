"""Multirun sweeps: each job in its own process, skips and resumes, and the summary at the end."""
