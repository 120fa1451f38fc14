"""Training under tf.distribute: mirrored over two logical CPU devices, and two workers on 127.0.0.1.

Each run is a fresh `python train.py` process (the command the README gives),
since devices and the multi-worker strategy are set up when TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import distribute

TINY = ["--preset", "tiny", "--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "1", "--precision", "float32"]


def run_train(args, run_dir, data_dir, env=None, wait=True):
    """Start `python train.py` with `args`; return the finished (or, with wait=False, running) process."""
    command = [sys.executable, "train.py", *TINY, "--run-dir", str(run_dir), "--data-dir", str(data_dir), *args]
    process_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    process = subprocess.Popen(command, cwd=ROOT, env=process_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    if wait:
        process.communicate(timeout=300)
    return process


def finish(process) -> tuple[int, str]:
    out, _ = process.communicate(timeout=300)
    return process.returncode, out


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_mirrored_over_two_cpu_devices_gives_the_default_strategys_loss_and_resumes(isbi_dir, tmp_path):
    results, processes = {}, {}
    for strategy in ("default", "mirrored"):  # side by side
        processes[strategy] = run_train(["--strategy", strategy, "--cpu-devices", "2"], tmp_path / strategy, isbi_dir,
                                        wait=False)
    for strategy, process in processes.items():
        code, out = finish(process)
        assert code == 0, out
        results[strategy] = (summary(tmp_path / strategy)["final_logs"], out)
    (default, _), (mirrored, out) = results["default"], results["mirrored"]
    assert "strategy mirrored (2 replicas" in out
    # The same global batches of 4, split 2 + 2 across the replicas: the same loss up to float rounding.
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        assert mirrored[key] == pytest.approx(default[key], rel=2e-3), key
    assert mirrored["loss"] != pytest.approx(0.6931, abs=1e-4)  # it learned something, not a constant 0.5 output

    code, out = finish(run_train(["--strategy", "mirrored", "--cpu-devices", "2", "--epochs", "2"], tmp_path / "mirrored",
                                 isbi_dir, wait=False))
    assert code == 0, out
    assert "resuming from" in out and summary(tmp_path / "mirrored")["epochs_done"] == 2


def test_two_workers_on_localhost_train_and_only_the_chief_writes(isbi_dir, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    run_dir = tmp_path / "run"
    processes, temp_dirs = [], []
    for index in range(2):
        temp_dirs.append(tmp_path / f"tmp{index}")
        temp_dirs[-1].mkdir()
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(run_train(["--strategy", "multiworker"], run_dir, isbi_dir, wait=False,
                                   env={"TF_CONFIG": tf_config, "TMPDIR": str(temp_dirs[-1])}))
    (chief_code, chief_out), (worker_code, worker_out) = (finish(p) for p in processes)
    assert chief_code == 0, chief_out
    assert worker_code == 0, worker_out
    assert "strategy multiworker (2 replicas)" in chief_out
    assert "not the chief" in worker_out
    # The chief wrote the run; the other worker wrote into a temporary folder, deleted at the end.
    assert {p.name for p in run_dir.iterdir()} >= {"best.keras", "last.keras", "state.json", "summary.json", "logs"}
    assert summary(run_dir)["epochs_done"] == 1
    assert list(temp_dirs[1].iterdir()) == []


def test_a_global_batch_that_does_not_split_across_replicas_is_refused(isbi_dir, tmp_path):
    code, out = finish(run_train(["--strategy", "mirrored", "--cpu-devices", "2", "--batch-size", "3"],
                                 tmp_path / "run", isbi_dir, wait=False))
    assert code == 1
    assert "batch_size 3 (the global batch) does not divide evenly across 2 replicas" in out


def test_unknown_strategy_and_missing_tf_config_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match="unknown strategy 'parameter_server'"):
        distribute.make_strategy("parameter_server")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.make_strategy("multiworker")


def test_the_default_strategy_is_the_chief_and_has_one_replica():
    strategy = distribute.make_strategy("default")
    assert distribute.is_chief(strategy) and distribute.replicas(strategy) == 1


def test_replicated_validation_pages_keep_every_mean():
    rng = np.random.default_rng(0)
    images, labels = rng.random((3, 8, 8, 1)), rng.random((3, 8, 8, 1)) > 0.5
    twice_images, twice_labels = distribute.replicate_pages(images, labels, count=2)
    assert twice_images.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(twice_images[::2], images)
    np.testing.assert_array_equal(twice_images[1::2], images)
    assert np.mean(np.abs(twice_images - twice_labels)) == pytest.approx(np.mean(np.abs(images - labels)))
