"""Ray Train's torch backend, loaded where it is used: Train's controller imports no torch before
it asks for the workers, and the driver's modules import none either.

`TorchTrainer` imports torch wherever it is imported (`ray.train.torch` imports it, 1.3 s on 2
cores), and its `TorchConfig` makes Train's controller import torch as it unpickles its
arguments, before it asks for the workers: on the way to the first training step
(benchmarks/FIRST_STEP.md). `TorchBackendConfig` is the same configuration in a module without
torch; its backend hands every call to the backend of an equal `TorchConfig` (so process-group
set-up, NCCL / gloo and shutdown stay Ray's own code), and the train function is `train_loop`,
which imports the service's loop (`worker.py`, torch and all) on the worker that runs it:

    DataParallelTrainer(train_loop, backend_config=TorchBackendConfig(backend="gloo"), ...)

(A `ray job submit` driver loads torch before it connects to Ray: `trainer.load_torch_before_ray`.)
What it gives up: Ray's state export (the dashboard's Train page) lists the run's framework as
unspecified, and with it no torch version: naming it would take a private Ray enum.
tests/test_torch_backend.py checks that the driver's modules import no torch and that the
backend's attributes match `TorchConfig`'s (it fails loudly if Ray changes them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig


@dataclass
class TorchBackendConfig(BackendConfig):
    """`ray.train.torch.TorchConfig`'s fields; `backend`: "nccl" (GPUs) or "gloo" (CPUs)."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return LazyTorchBackend

    @property
    def train_func_context(self):
        return TorchContext

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def torch_config(self):
        """The equal `TorchConfig` (imports torch)."""
        from ray.train.torch import TorchConfig

        return TorchConfig(**asdict(self))


class LazyTorchBackend(Backend):
    """`TorchConfig`'s backend, imported at the first call (in Train's controller, once the
    workers are up). Its class attributes are `_TorchBackend`'s (tests/test_torch_backend.py)."""

    share_cuda_visible_devices: bool = True
    has_replica_groups: bool = False

    def on_start(self, worker_group, backend_config: TorchBackendConfig) -> None:
        config = backend_config.torch_config()
        config.backend_cls().on_start(worker_group, config)

    def on_training_start(self, worker_group, backend_config: TorchBackendConfig) -> None:
        config = backend_config.torch_config()
        config.backend_cls().on_training_start(worker_group, config)

    def on_shutdown(self, worker_group, backend_config: TorchBackendConfig) -> None:
        config = backend_config.torch_config()
        config.backend_cls().on_shutdown(worker_group, config)


class TorchContext:
    """`TorchConfig`'s context around the train function on every worker (it selects the
    worker's CUDA device)."""

    def __enter__(self):
        self._inner = TorchBackendConfig().torch_config().train_func_context()
        return self._inner.__enter__()

    def __exit__(self, *exc) -> bool:
        return self._inner.__exit__(*exc)


def train_loop(config: dict) -> list[dict] | None:
    """The train function Train's workers run: the service's loop, imported here, on the worker.
    Rank 0's return value (the run's per-epoch history) is `Result.return_value`."""
    from emergence_ray.worker import train_loop_per_worker

    return train_loop_per_worker(config)
