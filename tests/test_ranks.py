"""Data-parallel ranks: the local launcher, the bucketed gradient sum, and 2 ranks training
exactly like 1 (language and dense stages)."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import mlx.core as mx
import pytest
from helpers import run_cli
from test_dense import dense_recipe, write_scenes
from test_train import prepared_workdir

from mm1_mlx.loading import DEMO_MODEL
from mm1_mlx.train import ranks

SUM_CHECK = """
import mm1_mlx
import mlx.core as mx
from mlx.utils import tree_flatten
from mm1_mlx.train.ranks import init_group, sum_over_ranks
group = init_group()
r = group.rank() + 1
tree = {"a": mx.arange(6.0).reshape(2, 3) * r, "b": [mx.ones(5, mx.float16) * r, mx.ones(()) * r],
        "c": mx.full((4,), 2.0) * r}
summed = sum_over_ranks(tree, group, bucket_bytes=24)  # a new bucket every 6 floats
plain = {"a": mx.arange(6.0).reshape(2, 3) * 3, "b": [mx.ones(5, mx.float16) * 3, mx.ones(()) * 3],
         "c": mx.full((4,), 6.0)}
same = all(mx.array_equal(x, y).item() and x.dtype == y.dtype
           for (_, x), (_, y) in zip(tree_flatten(summed), tree_flatten(plain)))
print(group.size(), same)
"""


def test_sum_over_ranks_in_small_buckets_of_mixed_dtypes(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ranks.free_ports(2)]))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SUM_CHECK],
            env=ranks.rank_environment(rank, 2, hostfile),
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [output.split() for output in outputs] == [["2", "True"]] * 2


def test_a_group_of_one_sums_nothing():
    tree = {"a": mx.ones(3)}
    assert ranks.sum_over_ranks(tree, mx.distributed.init()) is tree


def test_a_rank_that_fails_alone_stops_the_others(monkeypatch):
    """The others would wait for it in a collective forever: after STRAGGLER_S they are killed,
    and the failure's exit code is the launcher's."""
    monkeypatch.setattr(ranks, "STRAGGLER_S", 0.5)
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    ended: queue.Queue = queue.Queue()
    for process in (stuck, failing):
        threading.Thread(target=lambda p=process: ended.put(p.wait()), daemon=True).start()
    began = time.perf_counter()
    assert ranks.wait_for_ranks([stuck, failing], ended, threading.Event()) == 3
    assert stuck.poll() is not None and time.perf_counter() - began < 30


@pytest.mark.slow
def test_a_dense_stage_on_two_ranks_equals_one(tmp_path):
    """The same logged losses (to float rounding) and weights: the ranks sum their halves of a
    loss normalised by the whole batch's counts."""
    write_scenes(tmp_path / "data", 12)
    dense_recipe(tmp_path, DEMO_MODEL, "out", "train.steps=3")
    losses = []
    for count in (1, 2):
        out = tmp_path / f"out{count}"
        command = [sys.executable, "-m", "mm1_mlx", "train", str(tmp_path / "dense.toml")]
        command += ["--set", "train.steps=3", "--out", str(out), "--ranks", str(count)]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in lines])
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    one, two = (mx.load(str(tmp_path / f"out{n}" / "model.safetensors")) for n in (1, 2))
    assert one.keys() == two.keys()
    assert all(mx.allclose(one[name], two[name], rtol=1e-4, atol=1e-5).item() for name in one)


@pytest.mark.slow
@pytest.mark.parametrize(
    "ranks, stop",
    [
        (2, "SIGINT to the process group"),  # Ctrl-C in a terminal
        (2, "SIGTERM to the launcher"),  # a scheduler, a closing laptop
        (1, "SIGTERM to the launcher"),
    ],
)
def test_a_stopped_run_saves_and_resumes(tmp_path, tiny_model_dir, ranks, stop):
    """Every rank ends its step, rank 0 saves, the launcher waits for them and exits 130;
    --resume continues."""
    workdir = prepared_workdir(tmp_path, tiny_model_dir)
    command = [sys.executable, "-m", "mm1_mlx", "train", str(workdir / "tiny-pretrain.toml")]
    command += ["--ranks", str(ranks), "--out", str(workdir / "run"), "--set", "log.every=1"]
    launcher = subprocess.Popen(
        [*command, "--set", "train.steps=1000"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
        time.sleep(0.2)
    if stop.startswith("SIGINT"):
        os.killpg(launcher.pid, signal.SIGINT)
    else:
        launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 130, err
    saved = re.search(r"interrupted at step (\d+); saved", err)
    assert saved, err
    step = int(saved.group(1))
    assert (workdir / "run" / "checkpoints" / f"step-{step:07d}").is_dir()
    resumed = [*command, "--resume", "--set", f"train.steps={step + 1}"]
    subprocess.run(resumed, check=True, capture_output=True, timeout=300)
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["step"] == step + 1


def test_ranks_must_split_the_batch(tmp_path, tiny_model_dir):
    workdir = prepared_workdir(tmp_path, tiny_model_dir)
    code, _, err = run_cli("train", str(workdir / "tiny-pretrain.toml"), "--ranks", "3")
    assert code == 1 and err == "error: a batch of 4 does not split evenly over 3 ranks\n", err
