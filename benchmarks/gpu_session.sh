#!/usr/bin/env bash
# One call on a lent GPU: install, check the kernels on hardware and time everything; every table is
# appended to docs/benchmarks.md (and copied to $OUT when set, for the device tool to bring back).
#
#     bash benchmarks/gpu_session.sh            # under 10 minutes (step limits sum to 560 s)
#     bash benchmarks/gpu_session.sh rl         # a second call (one call may run 10 minutes): GRPO steps
#
# The attention benchmark checks each kernel against the XLA reference on the GPU before timing it
# (flash forward and dq/dk/dv; paged decode on every case), and the grouped-matmul benchmark checks the
# Pallas grouped GEMM (through impl="auto" and its self-check) against the blocked XLA form; a step that
# fails or runs past its time is reported and the session goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || true
python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
# ptxas matters: JAX refuses causal attention on ptxas 12.8.0-12.9.0 (a miscompile that also fits our masks)
ptxas=$(command -v ptxas || python -c "import importlib.util as u, os; s = u.find_spec('nvidia.cuda_nvcc'); \
print(os.path.join(list(s.submodule_search_locations)[0], 'bin', 'ptxas'))" 2>/dev/null)
if [ -n "$ptxas" ] && [ -x "$ptxas" ]; then "$ptxas" --version | tail -1; else echo "ptxas: not found"; fi
python -c "import jax; print('CUDA runtime / driver:', jax.devices()[0].client.platform_version)" 2>/dev/null || true
step() {
    local limit=$1; shift
    echo "== $*"
    timeout "$limit" python "$@" || echo "!! exit $?: $*"
}
if [ "${1:-}" = "rl" ]; then  # GRPO at the 0.6B shape and at 30B-A3B's widths, 4 layers; TRL beside if installed
    trl=$(python -c "import trl" 2>/dev/null && echo "" || echo "--skip-trl")
    step 240 benchmarks/grpo.py --model qwen3-0.6b --prompts 16 --group 8 --max-new-tokens 256 --steps 3 $trl
    step 240 benchmarks/grpo.py --model qwen3-30b-a3b --layers 4 --prompts 16 --group 8 --max-new-tokens 256 --steps 3 $trl
    if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
    exit 0
fi
# attention: device time (dispatch excluded); paged at pages of 16 and 64 up to 32k (the target case: batch
# 64, 8k context); flash forward and backward beside cuDNN. A step cut short by its limit still records
# the rows it measured.
# registers and spills of every Pallas kernel (ptxas's report, through Mosaic GPU's dump), compiled by the
# kernels' self-checks (head_dim 128, bf16); a CPU cannot produce this (the PTX pipeline runs in the CUDA plugin)
echo "== ptxas: registers and spills per kernel"
MOSAIC_GPU_DUMP_PTXAS=1 timeout 60 python -c "import kernels as k
for kind in ('flash', 'paged', 'grouped'): print(kind, 'self-check passed:', k._self_check(kind, 'bfloat16', 128))" 2>&1 \
    | grep -iE "self-check|registers|spill|error" | head -60
step 140 benchmarks/attention.py --parts paged --batches 1 64 --contexts 8192 32768 --block-sizes 16 64 --impls pallas cudnn --iters 10
step 130 benchmarks/attention.py --parts flash --seqs 1024 4096 16384 --iters 10
step 80 benchmarks/train_mfu.py --models qwen3-0.6b
step 50 benchmarks/grouped_matmul.py --tokens 4096 16384 --iters 5
step 100 benchmarks/throughput.py --no-hf  # cold, an untimed call that builds every program, warm
if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
