"""`train.bf16: auto`: bf16 autocast only where the device computes bf16 natively, fp32 elsewhere.

On CUDA the answer is `torch.cuda.is_bf16_supported()`. On a CPU it is the CPU's bf16 instructions
(x86 `avx512_bf16` or `amx_bf16`, Arm `bf16`) *and* oneDNN's consent to use them:

- the flags alone miss `ONEDNN_MAX_CPU_ISA=AVX2`, under which oneDNN emulates bf16 although the
  instructions exist (measured on an AMD EPYC with avx512_bf16: a 256x576 @ 576x1536 matmul takes
  0.57 ms in bf16 and 2.5 ms in fp32 natively, 13.7 ms in bf16 under that variable);
- oneDNN's answer alone (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`) is True on every AVX-512
  CPU, Skylake and Cascade Lake included, which have no bf16 instructions: oneDNN then emulates
  bf16 too (its check is "can compute", not "has units").

Where bf16 is emulated it is the slowest choice: on an AMD EPYC Zen 3 (AVX2 and FMA only) a
16x576 @ 576x1536 matmul took 2.12 ms in bf16 and 0.39 ms in fp32 (5.4x; 6.3x at 256 rows), a
PMD step 72 s under bf16 autocast and 9.6 s in fp32. No timed probe: it costs start-up time and
reads noise on a shared machine, where the features above answer exactly.

`resolve_bf16` is the one place that decides; every consumer (the trainers' autocast, the hf
engine's decode copy and weight packing, the attention path, the reward and preference models)
reads the resolved `train.bf16` bool. The decision takes the CPU's answers as an argument, so
tests run both decisions on any host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("alignment")

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 / AMX, Arm (cpuinfo "Features")
EMULATED_SLOWDOWN = "~5x"  # bf16 against fp32 where bf16 is emulated (measured above)


@dataclass(frozen=True)
class CPUFeatures:
    """What decides CPU precision, and what `align bench` prints about the host."""

    flags: frozenset[str] | None  # None: not readable (not Linux); oneDNN's answer then decides alone
    onednn_bf16: bool  # oneDNN would run bf16 kernels (False under ONEDNN_MAX_CPU_ISA=AVX2 or on AVX2 CPUs)
    capability: str  # ATen's kernel set: AVX512, AVX2, DEFAULT, ...

    def has(self, flag: str) -> bool:
        return self.flags is not None and flag in self.flags

    def summary(self) -> dict[str, bool | str]:
        return {"avx2": self.has("avx2"), "avx512": self.has("avx512f"), "avx512_bf16": self.has("avx512_bf16"),
                "amx": self.has("amx_bf16"), "onednn_bf16": self.onednn_bf16, "aten_capability": self.capability}


def cpu_features() -> CPUFeatures:
    flags = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags = frozenset(value.split())
                break
    except OSError:
        pass
    onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return CPUFeatures(flags, onednn, torch.backends.cpu.get_cpu_capability())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: str | None = None, features: CPUFeatures | None = None) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, why)."""
    device = device or default_device()
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, "CUDA device with bf16 support"
        return False, "this CUDA device has no bf16 support"
    if device != "cpu":
        return False, f"device {device}: bf16 not known to be native"
    features = features or cpu_features()
    units = sorted(f for f in CPU_BF16_FLAGS if features.has(f))
    if features.flags is None and features.onednn_bf16:
        return True, "oneDNN runs bf16 here (CPU flags unreadable)"
    if units and features.onednn_bf16:
        return True, f"this CPU has bf16 units: {', '.join(units)}"
    if units:
        return False, (f"this CPU has bf16 units ({', '.join(units)}) but oneDNN will not use them "
                       f"(ONEDNN_MAX_CPU_ISA?)")
    return False, f"this CPU has no bf16 units: {features.capability}"


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str
    warning: str | None = None  # set where an explicit bf16 will run emulated

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def log(self) -> None:
        """Once the run's console is set up (`Trainer.train`)."""
        log.info("precision: %s (%s)", self.name, self.reason)
        if self.warning:
            log.warning(self.warning)


def resolve_bf16(setting: bool | str, device: str | None = None, features: CPUFeatures | None = None) -> Precision:
    """`train.bf16` (True, False or "auto") -> the precision a run uses, with its reason. An explicit
    True where bf16 is emulated still runs, with a warning."""
    native, why = native_bf16(device, features)
    if setting == "auto":
        return Precision(native, f"train.bf16: auto; {why}" + ("" if native else
                                                             f"; bf16 would be {EMULATED_SLOWDOWN} slower here"))
    if setting is True and not native:
        return Precision(True, f"train.bf16: true; {why}",
                         f"train.bf16=true but {why}: bf16 is emulated and runs {EMULATED_SLOWDOWN} slower than fp32 "
                         "here (train.bf16: auto or false picks fp32)")
    return Precision(bool(setting), f"train.bf16: {str(bool(setting)).lower()}")
