"""Shared test fixtures: the project root on sys.path, a tiny synthetic twin set and one short training run."""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)

TINY_ARCH = os.path.join(FIXTURES, "vit", "dinov2_tiny_reg4.pth")
IMG = 56  # a 4x4 patch grid: small enough for CPU tests, large enough for maps


def run_py(args, cwd=ROOT, env=None, timeout=600, check=True):
    """Run a project script in a fresh interpreter; return the completed process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(tmp, data_dir, **overrides):
    """A YAML config for a few-second CPU run on the synthetic set."""
    cfg = {"train_info": f"{data_dir}/train_info.json", "train_pairs": f"{data_dir}/train_pairs.json",
           "test_info": f"{data_dir}/test_info.json", "test_pairs": f"{data_dir}/test_pairs.json",
           "cache_dir": f"{tmp}/cache", "arch": TINY_ARCH, "img_size": IMG, "deep_prompts": 2,
           "epochs": 3, "batch_size": 16, "images_per_person": 2, "val_families": 3, "out_dir": f"{tmp}/run",
           "lr": 0.003, "trait_prompts": 4}  # 2 x 2 cells on the 4 x 4 patch grid
    cfg.update(overrides)
    path = os.path.join(tmp, "cfg.yaml")
    with open(path, "w") as f:
        f.write("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    run_py(["data.py", "synth", "--out", str(out), "--size", str(IMG)])
    return str(out)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synth_dir):
    """One short promptcam (v1) run shared by the evaluation and explanation tests: (tmp dir, config path)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, synth_dir, epochs=2, method="promptcam")
    run_py(["train.py", "--cfg", cfg])
    return str(tmp), cfg
