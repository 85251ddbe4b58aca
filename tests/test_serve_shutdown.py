"""`qwenvl serve` as a process: SIGTERM in the middle of a stream ends it cleanly and the server exits with 0."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qwenvl

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

CHECKPOINT = Path(__file__).parent / "data" / "golden" / "checkpoint"
SHUTDOWN_TIMEOUT = 1.0  # --shutdown-timeout: a 2000-token stream (several seconds here) cannot finish in it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def test_sigterm_mid_stream_ends_the_stream_cleanly_and_exits_with_0(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(qwenvl.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "qwenvl.cli", "serve", "-m", str(CHECKPOINT), "--dtype", "fp32",
                                   "--device", "cpu", "--port", str(port), "--served-model-name", "golden",
                                   "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)], stdout=out, stderr=subprocess.STDOUT,
                                  env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not come up in 120 s: " + log.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        events, signalled_at = [], None
        body = {"model": "golden", "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as reply:  # 30 s per read at most
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if not line:
                    continue
                assert line.startswith("data: "), line
                events.append(line[6:])
                if len(events) == 3:  # mid-stream
                    server.send_signal(signal.SIGTERM)
                    signalled_at = time.monotonic()
        assert signalled_at is not None and events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        if "error" in last:  # cut at the shutdown timeout: an error event, then [DONE]
            assert last["error"]["code"] == 503 and "shut down" in last["error"]["message"]
        else:  # or all of it in time (never told "stop" for a cut answer)
            assert last["usage"]["completion_tokens"] == 2000, events[-3:]
            assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"

        code = server.wait(timeout=SHUTDOWN_TIMEOUT + 30)
        assert code == 0, log.read_text()
        assert time.monotonic() - signalled_at < SHUTDOWN_TIMEOUT + 30
        assert refused(port)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
