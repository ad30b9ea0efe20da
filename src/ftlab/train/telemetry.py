"""GPU telemetry for the training metrics: memory and utilisation of the device a process trains on.

    stats.update(gpu_metrics(device))   # {} on a CPU

Logged per step beside tokens/s (and pretraining's MFU), from the process that writes the metrics (rank 0):

* gpu/mem_allocated_gib: tensors alive now (torch.cuda.memory_allocated), after the optimizer step;
* gpu/mem_peak_gib: the most ever allocated so far in this process (torch.cuda.max_memory_allocated; never reset
  here, so a benchmark reading it at the end still sees the whole run's peak);
* gpu/mem_reserved_gib: what PyTorch's caching allocator holds from the driver (memory_reserved), the figure
  closest to what nvidia-smi shows for the process, minus the CUDA context;
* gpu/util_pct: the share of the last sample period a kernel ran on the GPU, from NVML (the nvidia-ml-py
  package, `import pynvml`) when importable, else `nvidia-smi` when on PATH (asked at most every
  SMI_INTERVAL_S seconds: a subprocess per step would cost more than a short step); left out when neither is.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
from functools import lru_cache
from typing import Any

import torch

log = logging.getLogger("ftlab")

GiB = 1024 ** 3
SMI_INTERVAL_S = 10.0


def gpu_metrics(device: torch.device) -> dict[str, float]:
    """Memory (GiB) and utilisation (%) of `device`; {} for anything but a CUDA device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    out = {"gpu/mem_allocated_gib": torch.cuda.memory_allocated(index) / GiB,
           "gpu/mem_peak_gib": torch.cuda.max_memory_allocated(index) / GiB,
           "gpu/mem_reserved_gib": torch.cuda.memory_reserved(index) / GiB}
    util = utilisation(index)
    if util is not None:
        out["gpu/util_pct"] = util
    return out


def device_uuid(index: int) -> str | None:
    """The GPU's UUID as NVML and nvidia-smi spell it ("GPU-..."): with CUDA_VISIBLE_DEVICES, torch's index
    is not NVML's, the UUID is the same everywhere."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else None


def utilisation(index: int) -> float | None:
    reader = _nvml_reader()
    if reader is not None:
        return reader(index)
    return _smi_reader().read(index) if shutil.which("nvidia-smi") else None


@lru_cache(maxsize=1)
def _nvml_reader() -> Any:
    """A function index -> utilisation % through NVML, or None when pynvml is missing or NVML does not start."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - ImportError, or NVMLError (no driver): fall back to nvidia-smi
        log.debug("NVML unavailable (%s)", e)
        return None

    def read(index: int) -> float | None:
        try:
            uuid = device_uuid(index)
            handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid
                      else pynvml.nvmlDeviceGetHandleByIndex(index))
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except pynvml.NVMLError as e:
            log.debug("NVML utilisation failed (%s)", e)
            return None

    return read


class _SmiReader:
    """nvidia-smi's utilization.gpu, kept for SMI_INTERVAL_S seconds per device."""

    def __init__(self) -> None:
        self.cache: dict[int, tuple[float, float | None]] = {}

    def read(self, index: int) -> float | None:
        now = time.monotonic()
        if index in self.cache and now - self.cache[index][0] < SMI_INTERVAL_S:
            return self.cache[index][1]
        value = self.query(index)
        self.cache[index] = (now, value)
        return value

    @staticmethod
    def query(index: int) -> float | None:
        target = device_uuid(index) or str(index)
        try:
            done = subprocess.run(["nvidia-smi", f"--id={target}", "--query-gpu=utilization.gpu",
                                   "--format=csv,noheader,nounits"],
                                  check=False, capture_output=True, text=True, timeout=5)
            return float(done.stdout.strip().splitlines()[0]) if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
            log.debug("nvidia-smi utilisation failed (%s)", e)
            return None


@lru_cache(maxsize=1)
def _smi_reader() -> _SmiReader:
    return _SmiReader()
