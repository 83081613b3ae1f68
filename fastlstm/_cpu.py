"""The CPU fastlstm runs on, described once at import, and the kernel variant chosen for it.

Kernels take their shape from this description, never from constants tuned on one machine
(the way ONNX Runtime's MLAS picks its GEMM kernel from CPUID once, and XNNPACK and BLIS
keep a table from micro-architecture to tile):

- the SIMD width of the explicit vector code (the micro-kernels, packers and the one-row
  kernel): 64 bytes with AVX-512, 32 with AVX2 + FMA, 16 otherwise (SSE, ARM64 NEON);
- the register block of the micro-kernel: as many rows of two vectors as the vector
  registers hold next to the panel's two vectors and one broadcast, and the general
  registers hold row pointers (6 rows with AVX2's 16 vector registers, 8 with AVX-512's
  32 on x86-64's 16 general registers, 14 with ARM64's 32 and 31);
- cache-size thresholds (:mod:`fastlstm._config`), from the sizes the OS reports.

What the CPU can do comes from LLVM's view of it, the one Numba compiles for: the host
CPU's features, or ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` when those are set (tests
set them to compile and run a narrower instruction set on a wider machine).

``FASTLSTM_VARIANT`` (``avx512``, ``avx2`` or ``v128``) forces a variant for tests and
reproducible figures; a variant the CPU cannot run is refused at import. Compiled kernels
are cached per variant (:func:`fastlstm._config.jit`), so switching never reuses another
variant's code.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import llvmlite.binding as llvm
import numba

ENV_VARIANT = "FASTLSTM_VARIANT"

# Cache sizes assumed when the OS does not say (typical of a current x86-64 core).
_DEFAULT_CACHES = {1: 32 << 10, 2: 1 << 20, 3: 8 << 20}


@dataclass(frozen=True)
class KernelVariant:
    """One shape of the explicit vector code: the same algorithm, another tile."""

    name: str
    vector_bytes: int  # one SIMD register
    registers: int  # vector registers the tile may fill
    rows: int  # rows of the micro-kernel's register block (two vectors per row)
    row_vectors: int  # vectors of the one-row kernel (independent accumulator chains)

    @property
    def label(self) -> str:
        return (
            f"{self.name} ({8 * self.vector_bytes}-bit vectors, {self.rows} x 2 register "
            f"block, one-row kernel {self.row_vectors} vectors)"
        )


def _variant(name: str, vector_bytes: int, registers: int, general_registers: int) -> KernelVariant:
    # Accumulators 2 r, the panel's 2 vectors and one broadcast: 2 r + 3 <= registers. Each
    # row of the block also keeps its own pointer into A in a general-purpose register, next
    # to about 8 for the loop (counter, panel, prefetch, strides): beyond general_registers -
    # 8 rows LLVM spills pointers inside the loop (measured on a Zen 4 with AVX-512: blocks
    # of 8-10 rows 100-110 GFLOP/s on one core, of 11-12 rows 36-56).
    rows = min((registers - 3) // 2, general_registers - 8)
    # The one-row kernel keeps row_vectors independent FMA chains: 8 hide the latency of
    # two FMA units (4 cycles x 2); wider vectors need no more chains, but no fewer either.
    return KernelVariant(name, vector_bytes, registers, rows, 8)


@dataclass(frozen=True)
class CpuInfo:
    """What fastlstm knows of the CPU (printed by ``fastlstm info``, ``bench``, ``profile``)."""

    model: str  # the OS's name of the processor
    llvm_name: str  # the CPU LLVM compiles for (Numba's target)
    architecture: str  # x86_64, aarch64, ...
    isa: str  # the widest vector instruction set LLVM may use: avx512, avx2, sse, neon, ...
    fma: bool
    vector_registers: int
    l1d_bytes: int  # per core
    l2_bytes: int  # per core
    l3_bytes: int  # in all (shared)
    cores: int  # CPUs this process may run on
    threads_per_core: int

    def summary(self) -> str:
        return (
            f"{self.model} ({self.llvm_name}, {self.architecture}, {self.isa}"
            f"{'+fma' if self.fma else ''}, {self.vector_registers} vector registers), "
            f"{self.cores} CPUs, {self.threads_per_core} thread(s) per core, "
            f"L1d {self.l1d_bytes >> 10} KiB, L2 {self.l2_bytes >> 10} KiB, "
            f"L3 {self.l3_bytes >> 20} MiB"
        )


def _llvm_target() -> tuple[str, dict[str, bool]]:
    """The CPU name and features Numba compiles for (its config overrides the host's)."""
    name = numba.config.CPU_NAME or llvm.get_host_cpu_name()
    if numba.config.CPU_FEATURES is not None:
        features = {}
        for item in numba.config.CPU_FEATURES.split(","):
            item = item.strip()
            if item[:1] in "+-" and len(item) > 1:
                features[item[1:]] = item[0] == "+"
        return name, features
    # A named CPU without a feature list still gets the host's features from Numba.
    return name, {key: bool(value) for key, value in llvm.get_host_cpu_features().items()}


def _model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cache_sizes() -> dict[int, int]:
    """Data/unified cache bytes per level, from sysfs, else glibc's sysconf, else defaults."""
    sizes: dict[int, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes[level] = int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        sizes = {}
    names = {1: "SC_LEVEL1_DCACHE_SIZE", 2: "SC_LEVEL2_CACHE_SIZE", 3: "SC_LEVEL3_CACHE_SIZE"}
    for level, name in names.items():
        if sizes.get(level, 0) <= 0 and name in os.sysconf_names:
            try:
                value = os.sysconf(name)
            except (OSError, ValueError):
                value = 0
            if value > 0:
                sizes[level] = value
    return {level: sizes.get(level, 0) or default for level, default in _DEFAULT_CACHES.items()}


def _threads_per_core() -> int:
    path = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    try:
        count = 0
        for part in path.read_text().strip().split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
        return max(1, count)
    except (OSError, ValueError):
        return 1


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe() -> CpuInfo:
    """Describe this CPU as Numba's target sees it (cheap: reads a few OS files)."""
    name, features = _llvm_target()
    arch = platform.machine().lower()
    x86 = arch in ("x86_64", "amd64", "i686", "x86")
    if x86 and features.get("avx512f"):
        isa, registers = "avx512", 32
    elif x86 and features.get("avx2"):
        isa, registers = "avx2", 16
    elif x86:
        isa, registers = ("avx" if features.get("avx") else "sse"), 16
    elif arch in ("aarch64", "arm64"):
        isa, registers = "neon", 32
    else:
        isa, registers = "generic", 16
    fma = bool(features.get("fma") or features.get("avx512f")) or isa == "neon"
    caches = _cache_sizes()
    return CpuInfo(
        model=_model_name(),
        llvm_name=name,
        architecture=arch,
        isa=isa,
        fma=fma,
        vector_registers=registers,
        l1d_bytes=caches[1],
        l2_bytes=caches[2],
        l3_bytes=caches[3],
        cores=_cores(),
        threads_per_core=_threads_per_core(),
    )


def runnable_variants(cpu: CpuInfo) -> dict[str, KernelVariant]:
    """Every variant this CPU can execute, widest first."""
    found = {}
    general = 31 if cpu.architecture in ("aarch64", "arm64") else 16
    if cpu.isa == "avx512":
        found["avx512"] = _variant("avx512", 64, 32, general)
    if cpu.isa in ("avx512", "avx2") and cpu.fma:
        found["avx2"] = _variant("avx2", 32, 16, general)
    # 128-bit vectors run everywhere (SSE2 is part of x86-64; NEON of ARM64); ARM64 and
    # AVX-512 CPUs have 32 vector registers, which the 128-bit tile may use as well.
    vector = 32 if cpu.isa in ("neon", "avx512") else 16
    found["v128"] = _variant("v128", 16, vector, general)
    return found


def choose_variant(cpu: CpuInfo, forced: str | None = None) -> KernelVariant:
    """The widest variant the CPU runs, or ``forced`` (refused if the CPU cannot run it)."""
    variants = runnable_variants(cpu)
    if forced:
        key = forced.strip().lower()
        if key not in variants:
            raise RuntimeError(
                f"fastlstm: {ENV_VARIANT}={forced!r}, but this CPU ({cpu.llvm_name}, {cpu.isa}) "
                f"runs only the variants {', '.join(variants)}"
            )
        return variants[key]
    return next(iter(variants.values()))


CPU = describe()
VARIANT = choose_variant(CPU, os.environ.get(ENV_VARIANT))


def info() -> dict:
    """The CPU description and the kernel variant in use, as plain data (for JSON)."""
    return {
        "cpu": asdict(CPU),
        "variant": asdict(VARIANT),
        "runnable_variants": list(runnable_variants(CPU)),
    }
