"""Data-parallel ranks: starting them on this machine, finding the group, summing gradients.

`mm1-mlx train RECIPE --ranks N` runs N ranks on this
machine with MLX's ring backend over loopback. It starts them itself rather than through
`mlx.launch`: that launcher relays the ranks' output by polling in a loop that never sleeps
(a whole core busy, as `top` shows), which on a 2-core machine takes half the compute from
the ranks. Here the ranks inherit the terminal and the launcher
sleeps in `wait()`. For several machines use `mlx.launch` (its ring or MPI backends): the
training code is the same, it only reads the group `mx.distributed.init()` returns.
"""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mm1_mlx.errors import UserError

BUCKET_BYTES = 64 << 20  # gradients travel in messages of at most this size (one if smaller)
STRAGGLER_S = 60.0  # after one rank fails, how long the others may take to end before a kill


def is_rank() -> bool:
    """True inside a rank that a launcher started (mlx.launch or `run_ranks`)."""
    return "MLX_RANK" in os.environ


def init_group() -> mx.distributed.Group:
    """This process's group: all ranks when started as a rank, else a group of one."""
    group = mx.distributed.init()
    if is_rank() and group.size() == 1 and os.environ.get("MLX_HOSTFILE"):
        raise UserError("started as a rank, but no distributed group could be formed")
    return group


def free_ports(count: int) -> list[int]:
    """Loopback ports that were free a moment ago (the ranks bind them right away)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def rank_environment(rank: int, ranks: int, hostfile: Path) -> dict[str, str]:
    env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
    # The machine's cores are shared out: N ranks each with all of them would oversubscribe.
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env.setdefault("OPENBLAS_NUM_THREADS", threads)
    return env


def run_ranks(ranks: int, command: list[str] | None = None, stdout: IO | None = None) -> int:
    """Run `command` (default: this `mm1-mlx` command again) as `ranks` ranks on this machine;
    their exit code (the first failure's, else 0). Rank 0 writes to `stdout` (default: this
    terminal), the others' output is dropped; every rank's errors are shown. Ctrl-C reaches
    every rank from the terminal, SIGTERM is passed on to them, and each ends its step and
    saves; the launcher waits for them. If a rank fails on its own, the others (blocked in a
    collective) are stopped."""
    command = command or [sys.executable, "-m", "mm1_mlx", *sys.argv[1:]]
    interrupted = threading.Event()
    processes: list[subprocess.Popen] = []

    def terminate(*_) -> None:  # SIGTERM is sent to the launcher alone: pass it on
        interrupted.set()
        for process in processes:
            process.send_signal(signal.SIGTERM)

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: interrupted.set()),
        signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
    }
    ended: queue.Queue = queue.Queue()
    with tempfile.TemporaryDirectory(prefix="mm1-ranks-") as folder:
        hostfile = Path(folder) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
        processes += [
            subprocess.Popen(
                command,
                env=rank_environment(rank, ranks, hostfile),
                stdout=stdout if rank == 0 else subprocess.DEVNULL,
            )
            for rank in range(ranks)
        ]
        for process in processes:
            threading.Thread(target=lambda p=process: ended.put(p.wait()), daemon=True).start()
        try:
            return wait_for_ranks(processes, ended, interrupted)
        finally:
            for stop, handler in previous.items():
                signal.signal(stop, handler)


def wait_for_ranks(processes: list, ended: queue.Queue, interrupted: threading.Event) -> int:
    codes = [ended.get()]
    while len(codes) < len(processes):
        failed = any(code != 0 for code in codes)
        try:
            codes.append(ended.get(timeout=STRAGGLER_S if failed else None))
        except queue.Empty:  # a rank failed and the others are stuck waiting for it
            for process in processes:
                if process.poll() is None and not interrupted.is_set():
                    process.kill()
    return next((code for code in codes if code != 0), 0)


def sum_over_ranks(tree, group: mx.distributed.Group, bucket_bytes: int = BUCKET_BYTES):
    """The arrays of `tree` summed elementwise over the group's ranks, sent as few, large
    messages: arrays of one dtype are packed into flat buckets of at most `bucket_bytes`."""
    if group.size() == 1:
        return tree
    leaves = tree_flatten(tree)
    summed: dict[str, mx.array] = {}
    bucket: list[tuple[str, mx.array]] = []
    size = 0  # bytes in the bucket

    def send() -> None:
        flat = mx.concatenate([array.reshape(-1) for _, array in bucket])
        flat = mx.distributed.all_sum(flat, group=group)
        offset = 0
        for name, array in bucket:
            summed[name] = flat[offset : offset + array.size].reshape(array.shape)
            offset += array.size
        bucket.clear()

    for name, array in leaves:
        if bucket and (array.dtype != bucket[0][1].dtype or size + array.nbytes > bucket_bytes):
            send()
            size = 0
        bucket.append((name, array))
        size += array.nbytes
    if bucket:
        send()
    return tree_unflatten([(name, summed[name]) for name, _ in leaves])
