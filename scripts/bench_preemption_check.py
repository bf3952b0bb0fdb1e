"""What the per-step preemption check costs (tp2d_exp.train.worker.RayInterrupts): Ray Train's
ray.train.get_preemption_info, a barrier of all workers through its synchronisation actor, timed side by side
with a one-int all-reduce over the workers' own process group (what a hand-made check would cost).

    python scripts/bench_preemption_check.py --workers 4 --calls 200
"""

from __future__ import annotations

import argparse
import os
import time


def _worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    calls = config["calls"]
    ray.train.get_preemption_info()  # warm-up: the first call sets up the barrier
    t0 = time.perf_counter()
    for _ in range(calls):
        ray.train.get_preemption_info()
    ray_ms = (time.perf_counter() - t0) / calls * 1e3
    flag = torch.zeros(1, dtype=torch.int64)
    dist.all_reduce(flag)
    t0 = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    gloo_ms = (time.perf_counter() - t0) / calls * 1e3
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} workers, {calls} calls: ray.train.get_preemption_info {ray_ms:.2f} ms per "
              f"call, gloo all-reduce of one int {gloo_ms:.3f} ms per call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.workers), _node_ip_address="127.0.0.1",
             include_dashboard=False, log_to_driver=True)
    TorchTrainer(_worker, train_loop_config={"calls": args.calls}, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ray.train.ScalingConfig(num_workers=args.workers)).fit()


if __name__ == "__main__":
    main()
