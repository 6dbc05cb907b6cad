"""Test setup: 8 fake CPU devices (for sharding tests), the tests dir on sys.path (`reference`), and the one
seeded random generator.

Every random draw in the tests comes from the `rng` fixture (or from `seed`). The seed is fresh per test
unless QWEN_JAX_TEST_SEED is set, and a failing test reports it: rerun with QWEN_JAX_TEST_SEED=<seed>.
"""

import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent XLA compilation cache for the whole run: the xdist workers, and the CLIs and servers the
# tests start as subprocesses (they inherit the environment), compile many identical programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"qwen-jax-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def mosaic_gpu_results(text: str) -> list[list[str]]:
    """The result types of every Mosaic GPU kernel call in lowered StableHLO, in order."""
    out = []
    for line in text.splitlines():
        if "stablehlo.custom_call @mosaic_gpu" in line:
            results = line.rsplit(") -> ", 1)[1]
            out.append(re.findall(r"tensor<([0-9a-z]+)>", results))
    return out


@pytest.fixture
def seed(request) -> int:
    """This test's seed: QWEN_JAX_TEST_SEED, or a fresh one; reported if the test fails."""
    env = os.environ.get("QWEN_JAX_TEST_SEED")
    value = int(env) if env else int(np.random.SeedSequence().entropy % 2**32)
    request.node.test_seed = value
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    value = getattr(item, "test_seed", None)
    if value is not None and report.failed:
        report.sections.append(("random seed", f"rerun with QWEN_JAX_TEST_SEED={value}"))
    return report


@pytest.fixture(scope="session")
def shipped_reward_model(tmp_path_factory):
    """The shipped model's body with a random score head, saved as a reward model with its tokenizer."""
    import jax

    import qwen_jax
    from qwen_jax.assets import DEFAULT_MODEL
    from qwen_jax.classifier import as_classifier, init_score_head

    config, params = qwen_jax.load_pretrained(DEFAULT_MODEL)
    tok = qwen_jax.load_tokenizer(DEFAULT_MODEL)
    rm = as_classifier(config, 1, tok.pad_token_id)
    params = {**{k: v for k, v in params.items() if k != "lm_head"}, "score": init_score_head(rm, jax.random.key(0))}
    path = tmp_path_factory.mktemp("rm") / "hf"
    qwen_jax.save_pretrained(path, rm, params, tokenizer=tok, progress=False)
    return str(path), rm, params, tok
