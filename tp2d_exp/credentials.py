"""Credentials (HF, W&B, object storage) for the workers, kept out of everything Ray writes down.

Ray writes a job's runtime env, env_vars included, in plain text into its session logs (runtime_env_agent.log,
on every node that starts a worker), so credentials never travel in it:
- a local Ray (cluster.address=null) is started by the driver, and its workers inherit the driver's
  environment: nothing is sent;
- to an attached cluster the driver hands them over through the GCS's internal key-value store, under a
  one-time random key that only the train-loop payload carries (a `Handoff`), and deletes them when the run
  ends. Each worker reads them into its os.environ before any HF or W&B call.

Why not the values in the payload itself: Ray Train V2 records train_loop_config as text (str() of each
value) in its run state, which the dashboard serves and, with Ray's export API on, writes to event files in
the session dir; and the payload is pickled into the object store (ray.put), which Ray spills to files in
the session dir under memory pressure. The GCS key-value store is held in the GCS's memory and logged
nowhere; reading it takes the cluster's token, which already lets one run code on every node.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

# Secrets, never in a runtime env. Other variables the workers need (W&B target, HF caches, the object
# storage endpoint, ...) are not secret and travel in the runtime env (tp2d_exp.driver.cluster.FORWARDED_ENV).
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN")
NAMESPACE = "tp2d_exp"


@dataclass(frozen=True)
class Handoff:
    """What a worker is given of the driver's credentials: their names, and the key under which they wait in
    the GCS key-value store (None: nothing to fetch). The key stays out of repr, so out of Ray's run state."""

    names: tuple[str, ...] = ()
    key: str | None = field(default=None, repr=False)

    def install(self) -> None:
        """On a worker: put the credentials into os.environ."""
        if self.key is None:
            return
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self.key, namespace=NAMESPACE)
        if raw is None:
            raise RuntimeError(f"the driver's credentials ({', '.join(self.names)}) are no longer in the cluster's "
                               "key-value store: the driver ended or lost the cluster; run the job again")
        os.environ.update(json.loads(raw))


def present() -> tuple[str, ...]:
    """The names of the credentials set in this process's environment."""
    return tuple(k for k in SECRET_ENV if os.environ.get(k))


@contextmanager
def hand_off(attached: bool) -> Iterator[Handoff]:
    """On the driver, around a run: the workers' Handoff of the credentials in this environment. Only an
    attached cluster needs one (a local Ray inherited them); the store's entry is deleted when the run ends.
    Private API (ray.experimental.internal_kv; ray is pinned to 2.60.x): Ray has no public key-value store."""
    values = {k: os.environ[k] for k in present()}
    if not attached or not values:
        yield Handoff()
        return
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    key = f"credentials/{uuid.uuid4().hex}"
    _internal_kv_put(key, json.dumps(values), namespace=NAMESPACE)
    try:
        yield Handoff(tuple(values), key)
    finally:
        _internal_kv_del(key, namespace=NAMESPACE)
