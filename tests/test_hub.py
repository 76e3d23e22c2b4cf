"""Hub pass-throughs never hang: a network that accepts connections and never answers is a one-line error.

A real TCP server on 127.0.0.1 accepts and stays silent; a subprocess (huggingface_hub and `datasets` read
HF_ENDPOINT and HF_HUB_OFFLINE once, at import) points the hub there with a 2 s limit and calls the three
places that reach the hub: a model id (`ExpertPool`), a tokenizer id (`data.tokenizer`), a hub dataset.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from expertmerge.errors import ExpertMergeError
from expertmerge.hub import HUB_TIMEOUT_ENV, bounded_hub_call, hub_timeout

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, time
from calib_data.rendering import load_tokenizer
from calib_data.sources import Source, load_source
from calib_data.tasks import TaskSpec
from expertmerge.sources import model_dir

calls = {
    "model": lambda: model_dir("someorg/some-model", "base model (someorg/some-model)"),
    "tokenizer": lambda: load_tokenizer("someorg/some-tokenizer"),
    "dataset": lambda: load_source(
        TaskSpec("t", "e", "someorg/some-data"), 0, Source("someorg/some-data", "hub", path="someorg/some-data")
    ),
}
report = {}
for name, call in calls.items():
    started = time.monotonic()
    try:
        call()
        report[name] = {"error": None}
    except Exception as error:
        report[name] = {"type": type(error).__name__, "error": str(error)}
    report[name]["seconds"] = time.monotonic() - started
print("REPORT " + json.dumps(report))
"""


class SilentServer:
    """Accepts every connection on 127.0.0.1 and never sends a byte."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


def test_hub_calls_behind_a_silent_network_fail_with_the_id_and_how_to_work_offline(tmp_path):
    server = SilentServer()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(
        HF_ENDPOINT=server.url,
        HF_HOME=str(tmp_path / "hf"),  # an empty cache: nothing can come from a previous run
        PYTHONPATH=str(REPO),
        EXPERTMERGE_CACHE=str(tmp_path / "cache"),
        **{HUB_TIMEOUT_ENV: "2"},
    )
    try:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
        )
        wall = time.monotonic() - started
    finally:
        server.close()
    line = next((x for x in done.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, done.stderr[-3000:]
    report = json.loads(line[len("REPORT ") :])
    assert server.connections, "the hub client never connected to the silent server"
    for name, repo in (("model", "someorg/some-model"), ("tokenizer", "someorg/some-tokenizer")):
        outcome = report[name]
        assert outcome["type"] == "ExpertMergeError", (name, outcome)
        message = outcome["error"]
        assert f"'{repo}'" in message and server.url in message and "within 2 s" in message, message
        assert f"hf download {repo}" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message
        # 2 s without progress, polled every 0.5 s; a loaded 2-core machine adds a little
        assert 2.0 <= outcome["seconds"] < 8.0, (name, outcome)
    dataset = report["dataset"]
    assert dataset["type"] == "ExpertMergeError" and "'someorg/some-data'" in dataset["error"], dataset
    assert "hf download someorg/some-data --repo-type dataset" in dataset["error"]
    assert 2.0 <= dataset["seconds"] < 8.0, dataset
    assert wall < 120  # the process exits although the abandoned calls still wait on their sockets


def test_a_call_that_answers_or_fails_is_passed_through_and_the_limit_is_checked(monkeypatch):
    assert bounded_hub_call(lambda: 42, "x", "org/name", progress=lambda: 0) == 42
    with pytest.raises(KeyError, match="gone"):
        bounded_hub_call(lambda: {}["gone"], "x", "org/name", progress=lambda: 0)
    monkeypatch.delenv(HUB_TIMEOUT_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "90")
    assert hub_timeout() == 90.0  # huggingface_hub's own longer wait is not cut short
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT")
    assert hub_timeout() == 60.0
    monkeypatch.setenv(HUB_TIMEOUT_ENV, "soon")
    with pytest.raises(ExpertMergeError, match=f"{HUB_TIMEOUT_ENV}='soon' is not a positive number"):
        hub_timeout()


def test_a_download_that_keeps_receiving_bytes_is_not_cut(monkeypatch):
    monkeypatch.setenv(HUB_TIMEOUT_ENV, "1")
    received = iter(range(10**6))
    assert (
        bounded_hub_call(lambda: time.sleep(2.5) or "done", "x", "org/name", progress=lambda: next(received))
        == "done"
    )
    with pytest.raises(ExpertMergeError, match=r"x: 'org/name' is not a local path .* within 1 s"):
        bounded_hub_call(lambda: time.sleep(30), "x", "org/name", progress=lambda: 0)
