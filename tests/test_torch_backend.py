"""torch_backend: the driver's modules import no torch (Train's controller unpickles them), and the lazy backend is
TorchConfig's (the fields and the class attributes Train reads). Fails loudly when Ray changes
either; the training itself runs through it in every end-to-end test (test_train_e2e, ...)."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

from ray.train.torch import TorchConfig

from emergence_ray.torch_backend import LazyTorchBackend, TorchBackendConfig

DRIVER = """
import pickle, sys
import emergence_ray.cli, emergence_ray.trainer, emergence_ray.data.pipeline, emergence_ray.data.handoff
from emergence_ray.config import load_config
from emergence_ray.torch_backend import TorchBackendConfig
from emergence_ray.trainer import Trainer, zoo_models
assert zoo_models(load_config(None, [])) is None  # the default job's small model needs no torchvision
config = pickle.loads(pickle.dumps(TorchBackendConfig(backend="gloo")))
backend = config.backend_cls()
print(sorted(m for m in ("torch", "torchvision", "sklearn") if m in sys.modules))
"""


def test_the_drivers_modules_import_no_torch():
    out = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_lazy_backend_is_torch_configs():
    assert [f.name for f in dataclasses.fields(TorchBackendConfig)] == [f.name for f in dataclasses.fields(TorchConfig)]
    config = TorchBackendConfig(backend="gloo", timeout_s=60)
    assert config.torch_config() == TorchConfig(backend="gloo", timeout_s=60)
    assert config.to_dict() == {"backend": "gloo", "init_method": "env", "timeout_s": 60}
    real = TorchConfig().backend_cls
    for attr in ("share_cuda_visible_devices", "has_replica_groups"):
        assert getattr(LazyTorchBackend, attr) == getattr(real, attr), attr
    # every hook Train calls on a backend is handed on
    hooks = {name for name in vars(real) if name.startswith("on_")} | {"on_start", "on_shutdown", "on_training_start"}
    assert hooks <= set(vars(LazyTorchBackend)), hooks - set(vars(LazyTorchBackend))
    assert pickle.loads(pickle.dumps(config)) == config
    with config.train_func_context():  # TorchConfig's context, on a CPU machine a no-op
        pass
