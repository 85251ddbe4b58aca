"""Start N tensor-parallel ranks of one command on this machine, as torchrun would (`--tensor-parallel-size N`).

Rank 0's output is the command's output (the other ranks' stdout is dropped); SIGTERM is passed on to it. When a rank exits with an
error, the others are stopped at once (SIGTERM, then SIGKILL after a grace period) and one DistributedError
names the rank, its exit status and its last error line: no rank is left waiting in a collective.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading

from .errors import DistributedError

ERROR_PREFIX = "qwenvl: error: "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_errors(stream, last: list, echo: bool) -> None:
    """Keep the last line of a rank's stderr; rank 0's is shown as it comes, except its error line (it goes
    into the launcher's one message)."""
    for line in stream:
        if line.strip():
            last[0] = line.strip()
        if echo and not line.startswith(ERROR_PREFIX):
            sys.stderr.write(line)
            sys.stderr.flush()


def _stop(procs: list, grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _forward_sigterm(procs: list):
    """SIGTERM to the launcher goes to rank 0, which shuts down in order (a server finishes its streams, then
    releases the other ranks). Ctrl-C reaches every rank from the terminal, so the launcher leaves it to them.
    Returns a function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def forward(signum, frame):
        if procs and procs[0].poll() is None:
            procs[0].send_signal(signal.SIGTERM)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None)}  # not SIG_IGN: ranks inherit that
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def run_ranks(command: list[str], size: int, env: dict | None = None, grace_s: float = 5.0) -> int:
    """Run `command` as ranks 0..size-1 (torchrun's environment, 127.0.0.1, a free port); 0 when all succeed."""
    port = free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size),
                LOCAL_WORLD_SIZE=str(size), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // size)))
    base.update(env or {})
    procs, lasts, readers, exits = [], [], [], queue.Queue()
    restore = _forward_sigterm(procs)
    try:
        for rank in range(size):
            p = subprocess.Popen(command, env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                                 stdout=None if rank == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, errors="replace")
            procs.append(p)
            lasts.append([""])
            readers.append(threading.Thread(target=_read_errors, args=(p.stderr, lasts[-1], rank == 0), daemon=True))
            readers[-1].start()
            threading.Thread(target=lambda r=rank, p=p: exits.put((r, p.wait())), daemon=True).start()
        failed = None
        for _ in range(size):
            rank, status = exits.get()
            if status != 0:  # the first rank to fail is the cause; the others would only wait on it
                failed = rank, status
                break
    finally:
        _stop(procs, grace_s)
        restore()
        for reader in readers:
            reader.join(grace_s)
    if failed is None:
        return 0
    rank, status = failed
    last = lasts[rank][0].removeprefix(ERROR_PREFIX) or "no error output"
    raise DistributedError(f"tensor-parallel rank {rank} of {size} exited with status {status}: {last}; "
                           "the other ranks were stopped")


def relaunch(argv: list[str], size: int) -> int:
    """`qwenvl <argv>` again, as `size` ranks."""
    return run_ranks([sys.executable, "-m", "qwenvl.cli", *argv], size)
