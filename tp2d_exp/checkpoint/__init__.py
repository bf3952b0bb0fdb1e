"""Sharded, mesh-free checkpoints that are whole or ignored: the Ray-free manager (DCP write, commit, verify,
fall back, resume on any mesh), the adapter that reports a committed one to Ray Train, and export to a plain
Hugging Face model dir."""
