"""What runs on every worker: the Ray Train entry point, the Ray-free step loop, the model's parallelisation
(TP styles, activation checkpointing, compile, FSDP2) and materialisation, the mesh's placement, optimizer,
faults and tracking."""
