"""The driver: one job from composed config to summary.json. Prepare the data, connect to and check the Ray
cluster, launch the TorchTrainer, follow its progress, assemble the summary."""
