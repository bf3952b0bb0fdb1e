"""Speed and memory, predicted and measured: the analytic model of a step's collectives and memory, the
collective counter and profiler split, the per-job probe, plan_only's planner and the mesh-sweep report."""
