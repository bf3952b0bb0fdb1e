"""What the user asks for and what the driver derives from it: the schema (Hydra groups), ParallelDims, the
frozen job spec every worker receives, and the validation stages that run before any worker starts."""
