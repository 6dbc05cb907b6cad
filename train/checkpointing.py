"""Training checkpoints with orbax: the train state (params, optimizer state, step, RNG) plus the data
iterator's position and run metadata.

Saves are asynchronous; orbax writes each step into a temporary directory and renames it when complete, so
a run killed at any moment restarts from the last complete checkpoint. The last `keep` are kept.

`restore_latest` verifies what it restores: a checkpoint that cannot be read (a truncated or emptied
file) is moved aside to `<directory>-unreadable/` (never deleted) and the next newest is tried."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import sys
import threading
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                    enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict | None = None, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta or {}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, like_state, step: int | None = None):
        """-> (state, data_state, meta) of `step` (default: the latest), placed like `like_state`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def restore_latest(self, like_state, warn: Callable[[str], None]):
        """-> (state, data_state, meta) of the newest readable checkpoint. Unreadable ones are moved aside
        with a warning; CheckpointError when none can be read."""
        from qwen_jax.errors import CheckpointError

        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _quiet_damage_reports():
                    return self.restore(like_state, step)
            except Exception as e:  # orbax, tensorstore and json raise many types for a damaged file
                reason = type(e).__name__ + (": " + str(e).strip().splitlines()[0][:120] if str(e).strip() else "")
                aside = os.path.join(self.directory + "-unreadable", str(step))
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), aside)
                warn(f"warning: checkpoint step {step} is unreadable ({reason}); moved it to {aside} and trying the "
                     f"previous one")
                self.manager.close()
                self.manager = ocp.CheckpointManager(self.directory, options=self.options)
        raise CheckpointError(f"{self.directory}: no readable checkpoint to resume from")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@contextlib.contextmanager
def _quiet_damage_reports():
    """While reading a possibly damaged checkpoint: orbax logs each failed read with its traceback, and its
    reader threads (tensorstore callbacks into an event loop the failure closed) print more tracebacks, some
    a moment after the failure. The failure itself is reported once, by the caller: while reading, and for a
    short grace after a failure, stderr (the file descriptor, which those threads write to) goes nowhere."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    absl = logging.getLogger("absl")
    level, hook, thread_hook = absl.level, sys.unraisablehook, threading.excepthook
    absl.setLevel(logging.CRITICAL)
    sys.unraisablehook, threading.excepthook = (lambda unraisable: None), (lambda args: None)
    os.dup2(devnull, 2)
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed:
            time.sleep(1.0)  # let the reader threads finish failing
        gc.collect()  # collect the abandoned coroutines while their reports are still silenced
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        absl.setLevel(level)
        sys.unraisablehook, threading.excepthook = hook, thread_hook
