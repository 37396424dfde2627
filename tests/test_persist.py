"""The cache outlives its process: what one process computed, the next one finds, without close().

Real processes (subprocess), real disk folders, a real redis-server. A writer answers and then
exits without close(), is killed with SIGKILL, or gets SIGTERM; a second process then reports the
cached tokens and gives the same greedy output. Nothing here waits on a clock: a writer that is
killed is killed once its objects are in the tier (polled, with a generous bound), which is what
"readable by another process soon after its request finished" needs; how soon is measured by
``kvtier.bench.persist`` (docs/benchmarks.md), not asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from tests.redis_servers import RedisServer

MODEL = "synthetic:tiny"
BS = 16
PROMPT = [(i * 37 + 11) % 250 for i in range(200)]  # 12 full blocks
MAX_TOKENS = 8
FULL_BLOCKS = (len(PROMPT) + MAX_TOKENS - 1) // BS  # the last token is never computed
POLL_S = 60.0  # bound of every wait: generous, since the machine may be busy

_SCRIPT = """
import json, signal, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
if args["mode"] == "hang-own-handler":  # the application's own SIGTERM handler, set first
    signal.signal(signal.SIGTERM, lambda *_: (print("own handler", flush=True), sys.exit(3)))
from kvtier import LLM, SamplingParams
llm = LLM(args["model"], **args["settings"])
out = llm.generate([args["prompt"]], SamplingParams(max_tokens=args["max_tokens"], temperature=0.0,
                                                    ignore_eos=True))[0]
print(json.dumps({"tokens": out.outputs[0].token_ids, "cached": out.num_cached_tokens}), flush=True)
if args["mode"].startswith("hang"):  # wait to be killed: no exit handler, no close
    while True:
        time.sleep(1)
# mode "exit": return without close(); the exit handler stores what is still queued
"""


def _start(settings: dict[str, Any], mode: str) -> subprocess.Popen[str]:
    args = {
        "model": MODEL,
        "settings": {"block_size": BS, "kv_cache_memory": 1 << 20, **settings},
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "threads": torch.get_num_threads(),
        "mode": mode,
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _answer(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=POLL_S)
        raise AssertionError(f"the process gave no answer: {proc.stderr.read() if proc.stderr else ''}")
    return dict(json.loads(line))


def _run(settings: dict[str, Any]) -> dict[str, Any]:
    """A process that answers and exits without close(); its answer."""
    proc = _start(settings, "exit")
    try:
        answer = _answer(proc)
        _, err = proc.communicate(timeout=POLL_S)
        assert proc.returncode == 0, err
        return answer
    finally:
        proc.kill()


def _wait_for(count: Callable[[], int], want: int) -> None:
    deadline = time.monotonic() + POLL_S
    while count() < want:
        assert time.monotonic() < deadline, f"the tier holds {count()} objects, not {want}"
        time.sleep(0.05)


def _disk_objects(root: Path) -> int:
    return len(list(root.rglob("*.kvt")))


def _disk(tmp_path: Path) -> dict[str, Any]:
    return {"tiers": "disk", "disk_path": str(tmp_path / "cache")}


def test_two_processes_share_a_disk_folder_without_close(tmp_path: Path) -> None:
    settings = _disk(tmp_path)
    first = _run(settings)
    assert first["cached"] == 0
    assert _disk_objects(tmp_path / "cache") == FULL_BLOCKS
    second = _run(settings)
    assert second["cached"] == 12 * BS  # every full prompt block (the last token is computed)
    assert second["tokens"] == first["tokens"]


def test_two_processes_share_a_redis_without_close(redis_server: RedisServer) -> None:
    settings = {"tiers": "redis", "redis_url": redis_server.url}
    first = _run(settings)
    assert first["cached"] == 0
    assert len(redis_server.client().keys("kvtier:*")) == FULL_BLOCKS
    second = _run(settings)
    assert second["cached"] == 12 * BS
    assert second["tokens"] == first["tokens"]


@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_a_writer_killed_after_its_answer_leaves_its_prefix(
    tier: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    """SIGKILL: no exit handler runs. What the writer threads stored after the answer, without
    close() or exit, is what the next process finds, whole."""
    if tier == "disk":
        settings = _disk(tmp_path)
        count: Callable[[], int] = lambda: _disk_objects(tmp_path / "cache")  # noqa: E731
    else:
        settings = {"tiers": "redis", "redis_url": redis_server.url}
        client = redis_server.client()
        count = lambda: len(client.keys("kvtier:*"))  # noqa: E731
    writer = _start(settings, "hang")
    try:
        first = _answer(writer)
        _wait_for(count, FULL_BLOCKS)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=POLL_S)
    assert writer.returncode == -signal.SIGKILL
    second = _run(settings)
    assert second["cached"] == 12 * BS
    assert second["tokens"] == first["tokens"]


def test_sigterm_flushes_and_terminates_as_before(tmp_path: Path) -> None:
    """SIGTERM right after the answer: the handler waits for the queued writes, then the process
    ends by the signal, as it would without kvtier's handler."""
    settings = _disk(tmp_path)
    writer = _start(settings, "hang")
    try:
        first = _answer(writer)
        writer.send_signal(signal.SIGTERM)
        writer.wait(timeout=POLL_S)
    finally:
        writer.kill()
    assert writer.returncode == -signal.SIGTERM
    assert _disk_objects(tmp_path / "cache") == FULL_BLOCKS
    second = _run(settings)
    assert second["cached"] == 12 * BS and second["tokens"] == first["tokens"]


def test_sigterm_chains_to_the_applications_own_handler(tmp_path: Path) -> None:
    settings = _disk(tmp_path)
    writer = _start(settings, "hang-own-handler")
    try:
        _answer(writer)
        writer.send_signal(signal.SIGTERM)
        out, _ = writer.communicate(timeout=POLL_S)
    finally:
        writer.kill()
    assert out.strip() == "own handler" and writer.returncode == 3
    assert _disk_objects(tmp_path / "cache") == FULL_BLOCKS
