"""Settings that are valid but pathological on the machine at hand: a sensible default or a warning.

:func:`check_training_config` runs at the start of ``train(cfg)``, before anything is built. It
returns the configuration to train with (a copy; the caller's is left alone) and logs one line per
finding, on global rank 0 only, each saying what was found, what it costs and what to set:

- mixed precision (``bf16-mixed``, ``16-mixed``) on a CPU without native bfloat16 arithmetic
  (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``): bf16 is then emulated and a step runs
  several times slower (the issue measured 2.5-4.6k against 22.8k tokens/s for the demo under
  2-process DDP). With ``cpu_precision=auto`` (the default) the run switches to ``32-true`` and
  says so; ``cpu_precision=keep`` keeps ``trainer.precision`` as given. ``16-true`` / ``bf16-true``
  on such a CPU are kept (an explicit choice of half-precision weights) but warned about;
- FSDP on a CPU (it shards memory across GPUs; on a CPU it only adds communication);
- more processes (``trainer.devices``) than CPU cores, or more intra-op threads over all processes
  (``num_threads`` x processes) than cores, on a CPU;
- more DataLoader worker processes (``data.num_workers`` x processes per node) than CPU cores;
- bfloat16 on a GPU without native bfloat16 (before Ampere): use ``16-mixed``.

"CPU cores" are the cores this process may run on (``os.sched_getaffinity``).
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

MIXED = ("bf16-mixed", "bf16", "16-mixed", "16")
HALF_TRUE = ("bf16-true", "16-true")
CPU_PRECISION = ("auto", "keep")
# oneDNN ISA limits that still include the bf16 instructions (ONEDNN_MAX_CPU_ISA caps what is used)
_BF16_ISAS = (
    "ALL",
    "AVX512_CORE_BF16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX2_VNNI_2",
)


def cpu_cores() -> int:
    """The number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes in bfloat16 natively: x86 ``avx512_bf16`` or ``amx_bf16``
    (unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below them), Arm ``bf16``. False when unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return isa in _BF16_ISAS
    return "bf16" in flags  # aarch64 (ARMv8.6 BF16 extension)


def _resolved_accelerator(trainer: DictConfig) -> str:
    acc = str(trainer.get("accelerator", "auto")).lower()
    if acc == "auto":
        if torch.cuda.is_available():
            return "gpu"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return "gpu" if acc == "cuda" else acc


def _processes_per_node(trainer: DictConfig, accelerator: str) -> int:
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str):
        if devices.strip() in ("auto", "-1"):
            if accelerator == "gpu":
                return max(1, torch.cuda.device_count())
            return 1  # Lightning's CPU accelerator counts one device for "auto"
        parts = [p for p in devices.split(",") if p.strip()]
        if len(parts) > 1 or devices.strip().endswith(","):
            return len(parts)  # "0,1": a list of device indices
        devices = int(devices)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    devices = int(devices)
    if devices == -1:
        return cpu_cores() if accelerator == "cpu" else max(1, torch.cuda.device_count())
    return max(1, devices)


def _strategy_name(trainer: DictConfig) -> str:
    strategy = trainer.get("strategy")
    if strategy is None:
        return ""
    if isinstance(strategy, (DictConfig, dict)):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1].lower()
    return str(strategy).lower()


def _gpu_lacks_bf16() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return not torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older PyTorch: no including_emulation argument
        return not torch.cuda.is_bf16_supported()


def check_training_config(cfg: DictConfig, rank_zero: bool | None = None) -> DictConfig:
    """The configuration to train with (see the module docstring); findings are logged on rank 0."""
    if rank_zero is None:
        from lightning_fabric.utilities.rank_zero import rank_zero_only

        rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    findings: list[str] = []
    cfg = copy.deepcopy(cfg)
    trainer = cfg.get("trainer")
    if trainer is None:
        return cfg
    accelerator = _resolved_accelerator(trainer)
    procs = _processes_per_node(trainer, accelerator)
    cores = cpu_cores()
    precision = str(trainer.get("precision", "32-true"))
    strategy = _strategy_name(trainer)
    policy = str(cfg.get("cpu_precision", "auto")).lower()
    if policy not in CPU_PRECISION:
        from protein_performer.errors import UserError

        raise UserError(f"cpu_precision={policy!r}: choose one of {', '.join(CPU_PRECISION)}")

    if accelerator == "cpu":
        if precision in MIXED and not cpu_has_native_bf16():
            if policy == "auto":
                with open_dict(trainer):
                    trainer.precision = "32-true"
                findings.append(
                    f"trainer.precision={precision} on a CPU without native bfloat16 (no avx512_bf16/amx_bf16): "
                    f"autocast would emulate it and train several times slower, so trainer.precision=32-true is used "
                    f"(set trainer.precision=32-true to silence this, or cpu_precision=keep to force {precision})"
                )
            else:
                findings.append(
                    f"trainer.precision={precision} on a CPU without native bfloat16 (cpu_precision=keep): expect "
                    f"training several times slower than with trainer.precision=32-true"
                )
        elif precision in HALF_TRUE and not cpu_has_native_bf16():
            findings.append(
                f"trainer.precision={precision} on a CPU without native bfloat16: half-precision arithmetic is "
                f"emulated and slow; trainer.precision=32-true is usually faster on a CPU"
            )
        if "fsdp" in strategy:
            findings.append(
                "FSDP on a CPU (trainer=fsdp with trainer.accelerator=cpu): it shards GPU memory and on a CPU only "
                "adds communication; use trainer=ddp trainer.accelerator=cpu (or trainer=cpu) instead"
            )
        if procs > cores:
            findings.append(
                f"trainer.devices={procs} CPU processes on {cores} CPU core(s): they take turns on the cores and "
                f"train slower than trainer.devices={cores}"
            )
        threads = cfg.get("num_threads")
        if threads and int(threads) * procs > cores:
            findings.append(
                f"num_threads={threads} x {procs} process(es) = {int(threads) * procs} threads on {cores} CPU core(s): "
                f"threads wait on each other; set num_threads={max(1, cores // procs)}"
            )
    elif accelerator == "gpu" and precision.startswith("bf16") and _gpu_lacks_bf16():
        findings.append(
            f"trainer.precision={precision} on a GPU without native bfloat16 (before Ampere): it is emulated and "
            f"slow; set trainer.precision=16-mixed"
        )

    data = cfg.get("data")
    workers = int(data.get("num_workers", 0) or 0) if data is not None else 0
    if workers and workers * procs > cores:
        findings.append(
            f"data.num_workers={workers} x {procs} process(es) = {workers * procs} DataLoader workers on {cores} CPU "
            f"core(s): they compete with training for the cores; set data.num_workers={cores // procs}"
        )

    if rank_zero:
        for message in findings:
            log.warning(message)
    return cfg
