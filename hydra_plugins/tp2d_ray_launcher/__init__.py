"""Hydra's `hydra/launcher=ray` for run.py sweeps on an attached Ray cluster (ray_launcher)."""
