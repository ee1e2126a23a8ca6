"""A CPU platform for verl (test scaffolding, not part of treerpo): verl 0.9.1 registers only NVIDIA, Huawei and AMD
platforms, so on a machine without them ``trainer.device=cpu`` silently becomes CUDA and its process group asks for
NCCL. This registers "cpu" (gloo, device "cpu", CUDA's memory and RNG calls answered for the CPU); select it with
``VERL_PLATFORM=cpu``, and load it first in ``VERL_USE_EXTERNAL_MODULES`` (some verl modules read the platform when
they are imported). Ray still sees logical "GPU"s: verl's placement groups ask for them."""

from __future__ import annotations

import contextlib
import types

import psutil
import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


def _device_module() -> types.ModuleType:
    """``torch.cpu`` with what verl calls on a device module and the CPU lacks."""
    module = types.ModuleType("cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    zero = lambda *a, **k: 0  # noqa: E731
    none = lambda *a, **k: None  # noqa: E731
    module.empty_cache = none
    module.synchronize = none
    module.set_device = none
    module.ipc_collect = none
    module.set_per_process_memory_fraction = none
    module.reset_peak_memory_stats = none
    module.is_available = lambda: True
    module.device_count = lambda: 1
    module.current_device = lambda: "cpu"
    module.get_device_name = lambda *a: "cpu"
    module.mem_get_info = lambda *a: (psutil.virtual_memory().available, psutil.virtual_memory().total)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(module, name, zero)
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.get_rng_state = torch.get_rng_state
    module.set_rng_state = torch.set_rng_state
    return module


def _one_gloo_backend() -> None:
    """verl asks for ``cpu:gloo,<device>:<backend>``, which on this platform names the CPU twice: torch refuses a
    repeated device type. The process group is asked for gloo alone instead."""
    import torch.distributed as dist

    init = dist.init_process_group
    if getattr(init, "_one_gloo", False):
        return

    def init_process_group(*args, backend=None, **kwargs):
        if isinstance(backend, str) and backend.replace(" ", "") == "cpu:gloo,cpu:gloo":
            backend = "gloo"
        return init(*args, backend=backend, **kwargs)

    init_process_group._one_gloo = True
    dist.init_process_group = init_process_group


_one_gloo_backend()


@PlatformRegistry.register("cpu")
class PlatformCPU(PlatformBase):
    _module = _device_module()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return False  # never picked by detection: only by VERL_PLATFORM=cpu

    def current_device(self):
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None
