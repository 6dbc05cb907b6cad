"""python -m train.pretrain end to end in subprocesses: errors, kill/resume, and two-process training."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from qwen_jax.safetensors_io import SafetensorsFile
from reference.hf_models import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int = 1):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model config, its tokenizer and a small JSONL corpus."""
    d = tmp_path_factory.mktemp("tiny")
    build_tokenizer(d / "tok")
    config = dict(model_type="qwen3", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                  tie_word_embeddings=True, rope_theta=10000.0)
    (d / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    with open(d / "data.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(20, 60)))}) + "\n")
    return d


def _args(tiny, out, steps, *extra):
    return [sys.executable, "-m", "train.pretrain", "--config", str(tiny / "config.json"), "--tokenizer",
            str(tiny / "tok"), "--data", str(tiny / "data.jsonl"), "--out", str(out), "--steps", str(steps),
            "--seq-len", "32", "--batch-size", "4", "--warmup", "2", "--lr", "1e-2", "--log-every", "1",
            "--save-every", "4", "--eval-batches", "2", "--no-progress", "--export-dtype", "float32", *extra]


def _run(args, devices=1, **kw):
    return subprocess.run(args, env=_env(devices), cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def _weights(export_dir):
    st = SafetensorsFile(os.path.join(export_dir, "model.safetensors"))
    return {k: np.array(st.get(k)) for k in st.keys()}


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tiny, tmp_path):
    steps = 60
    ref = _run(_args(tiny, tmp_path / "ref", steps))
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_args(tiny, out, steps), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.isdigit() for p in os.listdir(ckpts)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    resumed = _run(_args(tiny, out, steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] is not None and 0 < summary["resumed_from"] < steps
    a, b = _weights(tmp_path / "ref" / "hf"), _weights(out / "hf")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ref_losses, got = _losses(tmp_path / "ref"), _losses(out)
    assert sorted(got) == list(range(1, steps + 1))
    assert all(got[s] == ref_losses[s] for s in got)  # the whole loss trajectory, bit for bit


@pytest.mark.slow
def test_two_processes_match_single_process(tiny, tmp_path):
    single = _run(_args(tiny, tmp_path / "single", 6, "--mesh", "data=2"), devices=2)
    assert single.returncode == 0, single.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_args(tiny, tmp_path / "multi", 6, "--mesh", "data=2", "--coordinator",
                                    f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)),
                              env=_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a, b = _weights(tmp_path / "single" / "hf"), _weights(tmp_path / "multi" / "hf")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * np.abs(a[k]).max(), err_msg=k)


@pytest.mark.parametrize("extra,message", [
    (["--config", "qwen3-7b"], "unknown preset 'qwen3-7b'"),
    (["--batch-size", "3", "--grad-accum", "2"], "must be a positive multiple of --grad-accum"),
    (["--seq-len", "4096"], "fewer than one batch"),
])
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, extra, message):
    r = _run(_args(tiny, tmp_path / "bad", 4, *extra))
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in r.stderr


def test_empty_dataset_and_existing_run(tiny, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    r = _run(_args(tiny, tmp_path / "e", 4) + ["--data", str(tmp_path / "empty.jsonl")])
    assert r.returncode == 2 and "no non-empty documents" in r.stderr and "Traceback" not in r.stderr
    ok = _run(_args(tiny, tmp_path / "run", 4))
    assert ok.returncode == 0, ok.stderr
    again = _run(_args(tiny, tmp_path / "run", 4))  # would overwrite: refused, nothing lost
    assert again.returncode == 2 and "pass --resume" in again.stderr
    assert (tmp_path / "run" / "checkpoints" / "4").exists()


def test_continue_from_hf_checkpoint_and_metrics_files(tiny, tmp_path):
    """--config DIR continues from the weights there (here: the shipped model) and writes all metric files."""
    from qwen_jax.assets import DEFAULT_MODEL

    out = tmp_path / "cont"
    args = _args(tiny, out, 3) + ["--config", DEFAULT_MODEL, "--tokenizer", DEFAULT_MODEL, "--eval-fraction", "0.2"]
    r = _run(args)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["train_loss"] < 0.75 * np.log(4096)  # trained weights, far from a fresh model's ~ln(V)
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "loss" in json.loads(line)] == [1, 2, 3]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    assert json.loads((out / "hf" / "config.json").read_text())["vocab_size"] == 4096


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(tiny, tmp_path):
    out = tmp_path / "run"
    first = _run(_args(tiny, out, 8))  # checkpoints at steps 4 and 8
    assert first.returncode == 0, first.stderr
    newest = out / "checkpoints" / "8"
    files = [p for p in newest.rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # a truncated file
    resumed = _run(_args(tiny, out, 12, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint step 8 is unreadable" in resumed.stderr and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"] == 4
    assert (out / "checkpoints-unreadable" / "8").is_dir()  # kept aside, never deleted


def _start(args):
    return subprocess.Popen(args, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, cond, limit=240.0):
    """Poll `cond()` every 5 ms while the process runs, at most `limit` seconds; -> whether it held."""
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(0.005)
    return False


def _steps_logged(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n") and '"loss"' in line]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("when", ["imports", "compile"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_start_up_stops_the_run_cleanly(tiny, tmp_path, sig, when):
    """Before the loop: while Python imports, and while the first step compiles (where a KeyboardInterrupt
    used to be swallowed by a garbage-collection callback and the run went on to the end)."""
    out = tmp_path / "run"
    proc = _start(_args(tiny, out, 200))
    if when == "imports":
        time.sleep(1.0)
    else:
        lines = []
        assert _wait_for(proc, lambda: lines.append(proc.stderr.readline()) or lines[-1].startswith("model:"))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    # 130 / 143; or, when the KeyboardInterrupt crossed a C extension's PyRun_* call during an import,
    # CPython ends the process with SIGINT itself (-2 here; a shell shows 130 either way)
    assert proc.returncode in (128 + sig, -signal.SIGINT), err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted before"), err[-3000:]
    assert not (out / "hf").exists() and _steps_logged(out) == []


MID_RUN_STEPS = 200


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    ref = _run(_args(tiny, out, MID_RUN_STEPS, "--no-export", "--save-every", "100"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    return _losses(out)


@pytest.mark.parametrize("sig,when", [(signal.SIGINT, "loop"), (signal.SIGTERM, "save")])  # one path for both
def test_a_signal_mid_run_saves_logs_and_resumes_to_the_uninterrupted_result(tiny, tmp_path, uninterrupted, sig,
                                                                             when):
    """In the loop (after a few steps) or while an asynchronous checkpoint is being written: exit 130 / 143,
    a checkpoint of the last completed step, metrics.jsonl through that step, and --resume ends where an
    uninterrupted run ends, bit for bit."""
    steps = MID_RUN_STEPS
    out = tmp_path / "run"
    proc = _start(_args(tiny, out, steps, "--no-export"))
    ckpts = out / "checkpoints"
    if when == "loop":
        hit = _wait_for(proc, lambda: len(_steps_logged(out)) >= 6)
    else:  # orbax writes a step into a temporary directory, renamed when complete
        hit = _wait_for(proc, lambda: ckpts.exists() and any("tmp" in n for n in os.listdir(ckpts)))
    assert hit, "the run ended before the signal could be sent"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("interrupted at step "), err[-3000:]
    step = int(last.split()[3].rstrip(":"))
    assert 0 < step < steps and f"checkpoint {step} is in" in last
    assert _steps_logged(out) == list(range(1, step + 1))  # every step the checkpoint covers is logged

    resumed = _run(_args(tiny, out, steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"] == step
    got = _losses(out)
    assert sorted(got) == list(range(1, steps + 1))
    assert all(got[s] == uninterrupted[s] for s in got)
