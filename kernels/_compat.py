"""The differences between jax 0.10.x (CI) and 0.11.x (the GPU image) that the Pallas Mosaic GPU kernels
meet, in one place.

* GPU interpret mode (running a Mosaic GPU kernel on any machine, with simulated SMEM, barriers and race
  detection) is private in 0.10 and public (`plgpu.InterpretGPUParams`) in 0.11.
* 0.10 has no CPU lowering for `layout_cast` (used by `plgpu.broadcasted_iota(..., layout=)` and by
  layout annotations), which interpret mode needs: an identity lowering is registered for it (a layout is
  meaningless on the CPU).
* Transposed SMEM operands for wgmma: `ref.T` on 0.11 (`transpose_ref` on 0.10); 0.10's interpreter cannot
  transpose a ref, so interpreted kernels there read a pre-transposed copy from memory instead
  (`smem_transpose`). Lowering for CUDA works on both.
* Register-resident wgmma operands: neither version's interpreter runs `pl.run_state` (in-place
  accumulation over `plgpu.ACC.init`) or a wgmma whose left operand is a register array (P in the
  attention forward). Interpreted kernels add a fresh accumulator and stage P through SMEM instead
  (`registers_mma`: same arithmetic); the lowering for CUDA (tests/test_flash_kernel.py) covers the
  register forms.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu

JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:2])

try:  # jax >= 0.11
    InterpretGPUParams = plgpu.InterpretGPUParams
except AttributeError:  # jax 0.10
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401


def reset_interpret_state() -> None:
    """Clear GPU-interpret-mode state after an exception inside an interpreted kernel."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    ipc.reset_gpu_interpret_mode_state()


def races_found() -> bool:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    return bool(ipc.get_races().races_found)


@functools.cache
def _register_cpu_layout_cast() -> None:
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic_gpu import core as gpu_core

    mlir.register_lowering(gpu_core.layout_cast_p, lambda ctx, x, **_: [x], platform="cpu")


def interpret_params(detect_races: bool = True):
    """GPU interpret-mode parameters: uninitialised memory reads as NaN, races detected."""
    _register_cpu_layout_cast()
    return InterpretGPUParams(detect_races=detect_races, uninitialized_memory="nan")


def interpreting(interpret) -> bool:
    """Whether a kernel called with `interpret` runs in GPU interpret mode (asked for, or forced by
    `interpret_mode()` around the call)."""
    from jax._src import config

    forced = config.pallas_tpu_interpret_mode_context_manager.value
    return bool(interpret) or isinstance(forced, InterpretGPUParams)


def smem_transpose(interpret) -> bool:
    """Whether a kernel may feed wgmma an SMEM ref viewed transposed: always on hardware and in lowering,
    in interpret mode only on jax >= 0.11."""
    return JAX_VERSION >= (0, 11) or not interpreting(interpret)


def registers_mma(interpret) -> bool:
    """Whether a kernel may accumulate wgmma products in place (run_state) and feed wgmma a left operand
    from registers: on hardware and in lowering, not in GPU interpret mode."""
    return not interpreting(interpret)


def transposed(ref):
    """An SMEM ref viewed transposed (last two dims), for a wgmma operand (jax >= 0.11 only)."""
    return ref.T if hasattr(ref, "T") else plgpu.transpose_ref(ref, (1, 0))


def interpret_mode():
    """Context manager: every Pallas Mosaic GPU kernel called inside runs in GPU interpret mode."""
    try:
        force = plgpu.force_gpu_interpret_mode
    except AttributeError:
        from jax._src.pallas.mosaic_gpu.interpret.params import force_gpu_interpret_mode as force
    return force(interpret_params())
