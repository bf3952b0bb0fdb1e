"""Sharded, mesh-free checkpoints that are whole or ignored: the Ray-free manager (DCP write, checksummed
commit, collective fall back, resume on any mesh and batch size), its files on a path or object storage
(store), background writes (async_save), the adapter that reports a committed one to Ray Train, and export to
a plain Hugging Face model dir."""
