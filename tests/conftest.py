"""Shared test helpers: the project root on sys.path, a tiny synthetic twin set, tiny training runs made once per
session, and the ways the tests start the project's scripts (a fresh interpreter, torchrun, a full disk)."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: one thread each, like the scripts they start
    import torch
    torch.set_num_threads(1)

TINY_ARCH = os.path.join(FIXTURES, "vit", "dinov2_tiny_reg4.pth")
IMG = 56  # a 4x4 patch grid: small enough for CPU tests, large enough for maps
ONE_THREAD = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_py(args, cwd=ROOT, env=None, timeout=600, check=True):
    """Run a project script in a fresh interpreter; return the completed process (text output)."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **ONE_THREAD, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def torchrun_line(*args):
    """The command line of `torchrun --nproc_per_node 2` running args, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *args]


def torchrun(args, cwd=ROOT, env=None, check=True):
    """A script under torchrun with two processes (gloo on CPU, one thread per process)."""
    return run_py(torchrun_line(*args)[1:], cwd=cwd, env=env, check=check)


def on_a_full_disk(code, limit):
    """Python code run where any file grows past `limit` bytes: writes fail as on a full disk (EFBIG, not ENOSPC)."""
    guard = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
    return run_py(["-c", guard + code], check=False)


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
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    path = os.path.join(tmp, "cfg.yaml")
    with open(path, "w") as f:
        f.write("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return path


def save_edited_checkpoint(ckpt, path):
    """A checkpoint a test has edited, saved with the checksum of what it now holds, as train.py would have."""
    import torch
    from checkpoints import content_digest
    ckpt = {k: v for k, v in ckpt.items() if k != "checksum"}
    torch.save({**ckpt, "checksum": content_digest(ckpt)}, path)


def write_set(folder, people, pairs, size=24):
    """A tiny info/pairs pair on disk, one simple image per file: (info path, pairs path, {id: paths})."""
    from PIL import Image
    info = {}
    for pid, n in people.items():
        os.makedirs(folder / pid, exist_ok=True)
        info[pid] = []
        for k in range(n):
            path = str(folder / pid / f"{k}.jpg")
            image = Image.new("RGB", (size, size + 8), (10 * k, 50, 200))
            image.paste((250, 250, 250), (size // 4, size // 4, size // 2, size // 2))  # not one flat colour
            image.save(path)
            info[pid].append(path)
    (folder / "info.json").write_text(json.dumps(info))
    (folder / "pairs.json").write_text(json.dumps(pairs))
    return str(folder / "info.json"), str(folder / "pairs.json"), info


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    run_py(["synth.py", "--out", str(out), "--size", str(IMG)])
    return str(out)


@pytest.fixture(scope="session")
def train_once(tmp_path_factory, synth_dir):
    """Trains a tiny run once per set of config overrides for the whole session: (folder, config, printed output).
    The tests that share a run read it and write only elsewhere."""
    runs = {}

    def train(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in runs:
            tmp = tmp_path_factory.mktemp("run")
            cfg = tiny_config(tmp, synth_dir, **overrides)
            runs[key] = str(tmp), cfg, run_py(["train.py", "--cfg", cfg]).stdout
        return runs[key]
    return train


# one three-epoch run per method, shared by the learning, evaluation and explanation tests (arcface trains a block,
# so that it writes a backbone of its own); the tests of one method's run share a worker (xdist_group), so that it is
# trained once
METHOD_RUNS = {"traits": {}, "arcface": {"method": "arcface", "train_blocks": 1}, "promptcam": {"method": "promptcam"}}


@pytest.fixture(scope="session")
def trained_run(train_once):
    """The default method's (traits) run: (folder, config)."""
    tmp, cfg, _ = train_once(**METHOD_RUNS["traits"])
    return tmp, cfg


@pytest.fixture(scope="session")
def promptcam_run(train_once):
    """The literal Prompt-CAM (v1) run: (folder, config)."""
    tmp, cfg, _ = train_once(**METHOD_RUNS["promptcam"])
    return tmp, cfg
