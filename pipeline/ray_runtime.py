"""Where the pipeline's Ray comes from: an embedded local Ray on 127.0.0.1, or an existing cluster.

`--address` (or RAY_ADDRESS) joins a cluster; otherwise a local Ray is started on loopback with the
machine's CPUs and shut down at the end. A Ray already initialised in this process (a test, a notebook)
is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray
from ray._private import ray_constants

log = logging.getLogger(__name__)

EMBEDDED_OBJECT_STORE_BYTES = 512 * 1024**2  # stages pass URLs and small stats, never bulk data


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[dict]:
    """Yields the cluster's resources; shuts down only a Ray that this call started."""
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        # Under `uv run`, Ray would rebuild the driver's environment for the workers (a fresh venv per
        # session). Local workers run on this very interpreter, so that only costs time.
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
        # `_node_ip_address="127.0.0.1"` alone is not enough: Ray swaps loopback for the machine's address
        # and its GCS, raylet and agents listen on every interface. Ray's "no clusters" mode (meant for
        # laptops) keeps every process on loopback; its processes read it from the environment.
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        log.info("starting an embedded Ray on 127.0.0.1 with %d CPUs", cpus)
        ray.init(
            address="local",  # a new instance even if a `ray start` cluster runs on this machine
            _node_ip_address="127.0.0.1",
            num_cpus=cpus,
            include_dashboard=False,
            object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
            log_to_driver=True,
        )
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def worker_count(resources: dict, cpus_per_worker: float, gpus_per_worker: float, num_tasks: int) -> int:
    """How many workers fit: by GPUs when GPU workers are asked for, else by CPUs; never more than tasks."""
    if gpus_per_worker > 0:
        fit = int(resources.get("GPU", 0) // gpus_per_worker)
        if fit == 0:
            from kmim.errors import ConfigError

            raise ConfigError(
                f"--gpus-per-worker {gpus_per_worker} but the Ray cluster has {resources.get('GPU', 0)} GPUs"
            )
    else:
        fit = int(resources.get("CPU", 1) // max(cpus_per_worker, 1e-9))
    return max(1, min(fit, num_tasks))
