import glob
import json
import os
import math
import re
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from conftest import (METHOD_RUNS, ONE_THREAD, ROOT, TINY_ARCH, free_port, on_a_full_disk, run_py, tiny_config,
                      torchrun, torchrun_line)
import bench
import checkpoints
import config
import devices
from errors import UserError


def trainable(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_config_errors_come_before_any_work(tmp_path, synth_dir, capsys):
    import train
    from errors import run_cli
    cfg = tiny_config(tmp_path, synth_dir)
    cases = [(["--cfg", cfg, "--learning_rate", "1"], "unknown config key 'learning_rate'"),
             (["--cfg", cfg, "--epochs", "three"], "config key 'epochs' needs a int, got 'three'"),
             (["--cfg", cfg, "--tracker", "tensorboard"], "'tracker' must be one of"),
             (["--cfg", str(tmp_path / "nope.yaml")], "nope.yaml: config file not found"),
             (["--cfg", cfg, "--time-budget", "soon"], "--time-budget: cannot read 'soon'"),
             (["--cfg", cfg, "--benchmark", "0"], "--benchmark 0: time at least one step")]
    (tmp_path / "typo.yaml").write_text("epochz: 3\n")
    cases.append((["--cfg", str(tmp_path / "typo.yaml")], "typo.yaml: unknown config key 'epochz'"))
    (tmp_path / "old.yaml").write_text("full: true\n")
    cases.append((["--cfg", str(tmp_path / "old.yaml")], "old.yaml: config key 'full' is retired; write val_families: 0"))
    for args, message in cases:
        status = run_cli(train.main, args)
        err = capsys.readouterr().err
        assert status == 1 and message in err and len(err.splitlines()) == 1, (args, err[-500:])
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "cache")


def test_a_checkpoints_config_is_completed_and_its_retired_keys_read_as_today():
    """A config saved by an older version: a key added since takes its default, `method` excepted (promptcam trained
    before it existed), and `full: true` held out no family, which `val_families: 0` says today."""
    old = config.trained_config({"full": True, "val_families": 12, "epochs": 5})
    assert old["val_families"] == 0 and old["epochs"] == 5 and old["method"] == "promptcam" and "full" not in old
    assert config.trained_config({"full": False, "val_families": 12})["val_families"] == 12
    assert set(config.trained_config({})) == set(config.DEFAULTS)


DATA_FILES = {"train_info": "train_dataset_infor.json", "train_pairs": "train_twin_pairs.json",
              "test_info": "test_dataset_infor.json", "test_pairs": "test_twin_pairs.json"}


@pytest.mark.parametrize("name, folder", [("t4x2", "/kaggle/input/nd-twin"), ("p100", "/kaggle/input/nd-twin"),
                                          ("2080ti_x2", "/data")])
def test_every_gpu_config_names_the_data_sets_own_files(name, folder):
    import train
    cfg = config.load_config([os.path.join(ROOT, "configs", f"{name}.yaml")], {})
    assert {k: cfg[k] for k in DATA_FILES} == {k: f"{folder}/{f}" for k, f in DATA_FILES.items()}
    old, new = cfg["path_remap"].split("=")
    assert old == "/kaggle/input/nd-twin/ND_TWIN_Dataset_224/ND_TWIN_Dataset_224"
    assert new.startswith(folder) and "448" in new  # 336 px from the 448-px crops, never upsampled 224s
    assert cfg["img_size"] > 224 and cfg["cache_dir"].startswith(("/kaggle/working", "/data"))


def killed_in_epoch_2(command, cwd=ROOT):
    """Start a training command and SIGKILL it, with every process it started, once epoch 2 is under way (epoch 1's
    checkpoint is on disk)."""
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.match(r"epoch 2/\d+ \[", line):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)


def assert_same_training_state(a_path, b_path):
    """Two last.pt files hold the same run state: epoch, step, validation, weights, optimiser and RNG."""
    a, b = (torch.load(p, weights_only=True) for p in (a_path, b_path))
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    assert a["val"] == b["val"] and a["best_eer"] == b["best_eer"] and a["threshold"] == b["threshold"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][k][name]), (k, name)
    assert len(a["rng"]) == len(b["rng"]) and all(torch.equal(x["augment"], y["augment"])
                                                  for x, y in zip(a["rng"], b["rng"]))


def test_sigkill_mid_epoch_then_resume_auto_matches_an_uninterrupted_run(tmp_path, synth_dir, train_once):
    straight, _, _ = train_once()
    cfg = tiny_config(tmp_path, synth_dir)
    killed_in_epoch_2([sys.executable, "train.py", "--cfg", cfg])
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0
    out = run_py(["train.py", "--cfg", cfg, "--resume", "auto"]).stdout
    assert "resumed" in out and "epoch 2/3" in out and "epoch 1/3 |" not in out
    assert_same_training_state(f"{straight}/run/last.pt", tmp_path / "run" / "last.pt")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2


def test_resume_with_another_config_is_refused(trained_run):
    tmp, cfg = trained_run
    proc = run_py(["train.py", "--cfg", cfg, "--resume", f"{tmp}/run/last.pt", "--img_size", "112",
                   "--epochs", "4"], check=False)
    assert proc.returncode != 0
    assert "was trained with another config" in proc.stderr and "img_size: 56 in the checkpoint, 112 now" in proc.stderr
    proc = run_py(["train.py", "--resume", f"{tmp}/run/nothing.pt"], check=False)
    assert proc.returncode == 1 and proc.stderr == f"{tmp}/run/nothing.pt: no such checkpoint\n"


@pytest.mark.xdist_group("promptcam")
def test_a_checkpoint_from_before_the_method_key_resumes_as_promptcam(promptcam_run, tmp_path):
    """Runs saved before `method` existed were promptcam runs; the default is traits. Their configs held `full`,
    retired since for `val_families: 0`."""
    tmp, cfg = promptcam_run
    ckpt = torch.load(f"{tmp}/run/last.pt", weights_only=True)
    for key in ("method", "margin", "scale", "trait_prompts"):
        del ckpt["config"][key], ckpt["model_args"][key]
    ckpt["config"]["full"] = False
    del ckpt["checksum"]  # nor did checksums
    old = tmp_path / "old"
    old.mkdir()
    torch.save(ckpt, old / "last.pt")
    import train  # resumed in this process up to its first step: the model it rebuilds and the weights it loads
    _, cfg, resume = train.configure(["--resume", str(old / "last.pt"), "--epochs", "4", "--out_dir", str(old)])
    procs = train.start_processes(cfg)
    run = train.start_run(cfg, train.load_train_set(cfg, procs, resume), procs, resume)
    assert cfg["method"] == "promptcam" and run.raw.method == "promptcam" and run.first_epoch == 3
    for name, value in run.raw.trainable_state().items():
        assert torch.equal(value, ckpt["model"][name]), name


def test_a_failed_save_leaves_the_previous_checkpoint_intact(trained_run):
    tmp, _ = trained_run
    last = f"{tmp}/run/last.pt"
    before = open(last, "rb").read()
    proc = on_a_full_disk(f"import torch, checkpoints; checkpoints.save_atomically({{'x': torch.zeros(100000)}}, {last!r})", 4096)
    assert proc.returncode != 0 and f"could not save {last}" in proc.stderr
    assert "the previous last.pt is intact" in proc.stderr
    assert open(last, "rb").read() == before and not glob.glob(f"{tmp}/run/*.tmp")
    assert torch.load(last, weights_only=True)["epoch"] == 2


# Reports every file a non-zero rank creates, changes or removes under the run's folder or the repo
# (torch's own scratch files in the system temp dir are not the project's output).
AUDIT = """
import os, sys
rank = os.environ.get("RANK", "0")
roots = tuple(os.environ["AUDIT_ROOTS"].split(":"))
def hook(event, args):
    if rank == "0" or not args or not isinstance(args[0], str):
        return
    path = os.path.abspath(args[0])
    if not path.startswith(roots):
        return
    if event == "open" and args[1] and any(c in args[1] for c in "wax+"):
        sys.stderr.write(f"RANK{rank}-WROTE {path}\\n")
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove"):
        sys.stderr.write(f"RANK{rank}-WROTE {event} {path}\\n")
sys.addaudithook(hook)
"""


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, synth_dir):
    """Two epochs with torchrun's two processes, every file a non-zero rank writes reported: (folder, output)."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "audit").mkdir()
    (tmp / "audit" / "sitecustomize.py").write_text(AUDIT)
    proc = torchrun(["train.py", "--cfg", tiny_config(tmp, synth_dir, epochs=2)],
                    env={"PYTHONPATH": str(tmp / "audit"), "AUDIT_ROOTS": f"{tmp}:{ROOT}"})
    return tmp, proc.stdout + proc.stderr


def test_torchrun_two_processes_agree_and_only_rank0_writes(two_process_run):
    tmp, output = two_process_run
    assert "trainable weights identical on all 2 ranks" in output
    assert "RANK1-WROTE" not in output, [line for line in output.splitlines() if "RANK1-WROTE" in line]
    assert output.count("epoch 2/2 |") == 1  # only rank 0 logs
    ckpt = torch.load(tmp / "run" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["augment"], ckpt["rng"][1]["augment"])
    assert sorted(os.listdir(tmp / "run")) in ([".lock", "best.pt", "last.pt", "previous.pt"],
                                               [".lock", "last.pt", "previous.pt"])


def test_two_processes_killed_mid_epoch_resume_to_the_uninterrupted_runs_state(two_process_run, synth_dir, tmp_path):
    straight, _ = two_process_run
    cfg = tiny_config(tmp_path, synth_dir, epochs=2)
    killed_in_epoch_2(torchrun_line("train.py", "--cfg", cfg))
    assert len(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["rng"]) == 2
    out = torchrun(["train.py", "--cfg", cfg, "--resume", "auto"]).stdout
    assert "resumed" in out and "epoch 2/2 |" in out and "bit-identical" not in out
    assert_same_training_state(straight / "run" / "last.pt", tmp_path / "run" / "last.pt")


def test_benchmark_under_torchrun_prints_its_figures_and_writes_nothing(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir)
    proc = torchrun(["train.py", "--cfg", cfg, "--benchmark"])
    output = proc.stdout + proc.stderr
    assert output.count("benchmark on CPU (1 threads) x2 process(es), fp32") == 1  # rank 0 only
    for figure in (r"[\d.]+ images/s per process, [\d.]+ in all", r"step time: data \d+%, augmentation \d+%, "
                   r"forward \d+%, backward \d+%, optimiser \d+%", r"peak memory: [\d.]+ GB",
                   r"gradient all-reduce alone \([\d,]+ values\): [\d.]+ ms per step, \d+% of the step time"):
        assert re.search(figure, output), (figure, output[-2000:])
    assert not os.path.exists(tmp_path / "run")


def test_bench_ddp_times_one_process_two_independent_ones_and_ddp(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir)
    output = run_py(["bench.py", "ddp", "--cfg", cfg, "--rounds", "1", "--steps", "3"]).stdout
    assert re.search(r"round 1: alone [\d.]+ \| two independent [\d.]+ [\d.]+ \| DDP [\d.]+ images/s per process",
                     output), output
    assert re.search(r"median images/s per process: alone [\d.]+, two independent [\d.]+ \([+-]\d+%\), "
                     r"DDP [\d.]+ \([+-]\d+%\)", output), output
    assert not os.path.exists(tmp_path / "run")
    broken = run_py(["bench.py", "ddp", "--cfg", cfg, "--rounds", "1", "--steps", "0"], check=False)
    assert broken.returncode != 0 and "--benchmark 0: time at least one step" in broken.stderr, broken.stderr


def count_benchmark_steps(rank, port, batch_sizes, out_dir):
    """One gloo rank of bench.time_steps with a step that records batch sizes (run by mp.spawn)."""
    import torch.distributed as dist
    import train
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    sizes = []
    procs = train.Processes(rank, 2, torch.device("cpu"), "fp32")
    bench.time_steps(lambda idx, timer=None: sizes.append(len(idx)),
                     [torch.zeros(n, dtype=torch.long) for n in batch_sizes[rank]], procs, warmup=2, steps=3)
    torch.save(sizes, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_benchmark_warms_up_every_batch_size_and_every_rank_takes_as_many_steps(tmp_path):
    # rank 0 holds the triplet family's larger batch; rank 1 does not: a step more on one rank would
    # leave the other waiting in DDP's gradient all-reduce (it hung on a GPU)
    import torch.multiprocessing as mp
    batch_sizes = [[48] * 6 + [52], [48] * 7]
    mp.spawn(count_benchmark_steps, args=(free_port(), batch_sizes, str(tmp_path)), nprocs=2)
    sizes = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert len(sizes[0]) == len(sizes[1]), sizes
    assert 52 in sizes[0][:-3], sizes  # compiled before the timed steps


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow server on localhost (tests that use it share a worker: xdist_group "mlflow")."""
    tmp_path = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    import urllib.request
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                os.killpg(server.pid, signal.SIGTERM)
                pytest.fail("mlflow server did not start")
            time.sleep(1)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def mlflow_logged(uri, run_dir, scratch):
    """What an MLflow store holds: {run id: (status, val_eer steps, test_eer (value, step)s, {key: [(epoch, file)]})}."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("twins-test").experiment_id])
    logged = {}
    for run in runs:
        rid = run.info.run_id
        images = {}
        for folder in client.list_artifacts(rid):
            for art in client.list_artifacts(rid, folder.path):
                epoch = int(re.fullmatch(r"epoch_(\d+)\.png", os.path.basename(art.path)).group(1))
                images.setdefault(folder.path, []).append((epoch, client.download_artifacts(rid, art.path, scratch)))
        logged[rid] = (run.info.status == "FINISHED", [m.step for m in client.get_metric_history(rid, "val_eer")],
                       [(m.value, m.step) for m in client.get_metric_history(rid, "test_eer")], images)
    return logged


def wandb_records(path):
    """Records of an offline W&B run file (LevelDB log blocks of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw, pos, block, buf = open(path, "rb").read(), 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def wandb_logged(uri, run_dir, scratch):
    """What offline W&B run files hold, in mlflow_logged's shape (an offline run has no finished status: True)."""
    logged = {}
    for f in sorted(glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")):
        rid = re.search(r"run-(\w+)\.wandb$", f).group(1)
        _, steps, tests, images = logged.setdefault(rid, (True, [], [], {}))
        for record in wandb_records(f):
            if record.WhichOneof("record_type") != "history":
                continue
            items = {}
            for i in record.history.item:  # an image is nested: its fields under the logged key
                key = [i.key] if i.key else list(i.nested_key)
                if len(key) == 1:
                    items[key[0]] = json.loads(i.value_json)
                else:
                    items.setdefault(key[0], {})[key[1]] = json.loads(i.value_json)
            steps += [items["epoch"]] if "val_eer" in items else []
            tests += [(items["test_eer"], items["epoch"])] if "test_eer" in items else []
            for key, value in items.items():
                if isinstance(value, dict) and value.get("_type") == "image-file":
                    images.setdefault(key, []).append((items["epoch"], os.path.join(os.path.dirname(f), "files",
                                                                                    value["path"])))
    return logged


TRACKERS = {"mlflow": mlflow_logged, "wandb": wandb_logged}


@pytest.mark.parametrize("kind", [pytest.param("mlflow", marks=pytest.mark.xdist_group("mlflow")), "wandb"])
def test_a_tracked_run_logs_its_session_and_the_tests_to_one_run(kind, tmp_path, synth_dir, request):
    """A budget-stopped session, its resume, evaluate.py --tracker and cam.py --tracker: one tracker run holding
    every epoch's metrics, the figures of every 2nd and the last epoch, and the test results at the best epoch
    (MLflow on a real server, W&B offline)."""
    from PIL import Image
    uri = request.getfixturevalue("mlflow_server") if kind == "mlflow" else None
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    cfg = tiny_config(tmp_path, synth_dir, tracker=kind, mlflow_uri=uri, mlflow_experiment="twins-test",
                      wandb_project="twins-test", log_images_every=2)
    work = tmp_path / "work"  # the user's current folder: nothing may land there
    work.mkdir()
    train, evaluate, cam = (os.path.join(ROOT, script) for script in ("train.py", "evaluate.py", "cam.py"))
    run_py([train, "--cfg", cfg, "--time-budget", "0.01s"], cwd=work, env=env)
    run_py([train, "--cfg", cfg, "--resume", "auto"], cwd=work, env=env)
    run = tmp_path / "run"
    run_py([evaluate, "--ckpt", str(run), "--out", str(tmp_path / "eval"), "--tracker", "--bootstrap", "50"],
           cwd=work, env=env)
    run_py([cam, "--ckpt", str(run), "--pairs", "test", "--n", "2", "--out", str(tmp_path / "gallery"),
            "--tracker"], cwd=work, env=env)
    assert os.listdir(work) == []
    logged = TRACKERS[kind](uri, run, str(tmp_path / "down"))
    best = torch.load(run / "best.pt", weights_only=True)["epoch"]
    assert list(logged) == [torch.load(run / "last.pt", weights_only=True)["tracker_run_id"]]
    [(finished, epochs, tests, images)] = logged.values()
    assert finished and epochs == [0, 1, 2]
    assert tests == [(pytest.approx(json.load(open(tmp_path / "eval" / "metrics.json"))["eer"]), best)]
    assert {k: sorted(e for e, _ in v) for k, v in images.items()} == {
        "val_roc": [1, 2], "val_explanation": [1, 2], "test_roc": [best], "test_pair_000_twin": [best],
        "test_pair_001_genuine": [best]}
    for _, path in sum(images.values(), []):
        with Image.open(path) as im:
            lo, hi = im.convert("L").getextrema()
            assert im.width > 200 and im.height > 100 and hi - lo > 100


def test_mlflow_without_a_server_keeps_its_store_and_figures_in_the_run_folder(tmp_path, monkeypatch):
    """No mlflow_uri and no MLFLOW_TRACKING_URI: an SQLite store in out_dir, the figures beside it, nothing in the
    folder the command runs in."""
    from PIL import Image
    from mlflow.tracking import MlflowClient
    from tracking import make_tracker
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = {"tracker": "mlflow", "mlflow_uri": "", "mlflow_experiment": "", "run_name": "", "out_dir": "run"}
    tracker = make_tracker(cfg)
    tracker.log_metrics({"val_eer": 0.25}, 0)
    tracker.log_image("val_roc", Image.new("RGB", (300, 200), (255, 0, 0)), 0)
    tracker.finish()
    assert sorted(os.listdir(tmp_path)) == ["run"] and sorted(os.listdir("run")) == ["mlartifacts", "mlflow.db"]
    client = MlflowClient(f"sqlite:///{tmp_path}/run/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"val_eer": 0.25}
    with Image.open(client.download_artifacts(tracker.run_id, "val_roc/epoch_000.png", str(tmp_path))) as im:
        assert im.size == (300, 200) and im.getpixel((0, 0)) == (255, 0, 0)


def test_a_tracker_that_cannot_start_warns_once_and_tracks_nothing(monkeypatch):
    from tracking import make_tracker
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.setenv("WANDB_API_KEY", "")
    cfg = {"tracker": "mlflow", "mlflow_uri": f"http://127.0.0.1:{free_port()}", "mlflow_experiment": "",
           "run_name": "", "out_dir": "run", "wandb_project": "x", "wandb_entity": ""}
    for kind, message in (("mlflow", "mlflow tracking unavailable"), ("wandb", "no W&B API key")):
        with pytest.warns(UserWarning, match=message) as warned:
            tracker = make_tracker({**cfg, "tracker": kind})
        assert len(warned) == 1 and tracker.kind == "none"


@pytest.mark.xdist_group("mlflow")
def test_a_tracker_that_fails_mid_run_warns_once_and_training_goes_on(tmp_path, synth_dir, mlflow_server):
    """The server refuses the run after epoch 1 (it was deleted there): one warning, and the run trains to its end."""
    from mlflow.tracking import MlflowClient
    cfg = tiny_config(tmp_path, synth_dir, epochs=2, tracker="mlflow", mlflow_uri=mlflow_server)
    proc = subprocess.Popen([sys.executable, "train.py", "--cfg", cfg], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **ONE_THREAD})
    for line in proc.stdout:
        if line.startswith("epoch 1/2 |"):  # epoch 1 tracked and saved
            MlflowClient(mlflow_server).delete_run(torch.load(tmp_path / "run" / "last.pt",
                                                              weights_only=True)["tracker_run_id"])
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "epoch 2/2 |" in out, err[-2000:]
    assert err.count("mlflow tracking failed") == 1 and "training goes on untracked" in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.xdist_group("arcface")
def test_arcface_method_trains_evaluates_writes_its_backbone_and_keeps_its_method(tmp_path, train_once, capsys):
    import model
    import train
    from errors import run_cli
    tmp, cfg, _ = train_once(**METHOD_RUNS["arcface"])
    run = f"{tmp}/run"
    assert {"best.pt", "last.pt", "backbone.pth"} <= set(os.listdir(run))
    ckpt = checkpoints.read_training_checkpoint(f"{run}/best.pt")
    assert ckpt["model_args"]["method"] == "arcface"
    trained = checkpoints.verifier_from_checkpoint(ckpt, "best.pt").eval()
    backbone = model.load_vit(f"{run}/backbone.pth", 56).eval()  # strictly, as `arch: backbone.pth`
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), trained.vit(x), atol=1e-6, rtol=0)
        assert not torch.allclose(backbone(x), model.load_vit(TINY_ARCH, 56).eval()(x), atol=1e-3)  # it trained
    ckpt["backbone_fingerprint"] = "of other weights"  # as when the `arch` file is replaced after training
    with pytest.raises(UserError, match="best.pt: was trained on other backbone weights than .* holds now"):
        checkpoints.verifier_from_checkpoint(ckpt, "best.pt")

    run_py(["evaluate.py", "--ckpt", f"{run}/best.pt", "--out", str(tmp_path / "eval")])
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["n_genuine"] > 0 and metrics["n_twin"] > 0 and 0 <= metrics["eer"] <= 1
    for argv, message in ((["--cfg", cfg, "--epochs", "4", "--method", "promptcam", "--resume", run],
                           "method: 'arcface' in the checkpoint, 'promptcam' now"),
                          (["--cfg", cfg, "--method", "siamese"],
                           "'method' must be one of ('promptcam', 'arcface', 'traits')")):
        assert run_cli(train.main, argv) == 1 and message in capsys.readouterr().err


def test_eta_counts_the_steady_epochs_not_a_slow_first_one():
    import train
    # the first epoch compiles (60 s); later ones take 10-12 s, one with a slow validation (30 s)
    assert train.eta_seconds([60.0], 4) == 240.0  # one epoch is all there is to go by
    assert train.eta_seconds([60.0, 10.0], 3) == 30.0
    assert train.eta_seconds([60.0, 10.0, 12.0, 30.0, 11.0], 10) == 10 * 11.5  # the median of 10, 12, 30, 11
    assert train.eta_seconds([60.0, 10.0, 12.0], 0) == 0.0


def test_compile_pays_only_when_the_run_is_long_enough():
    import train
    # ViT-B/14 at 336 px on a T4: ~0.6 s per step, 30 epochs of ~120 steps: compile
    assert devices.compile_pays(0.6, 30 * 120)
    # the demo config on an H100: ~15 ms per step, 30 epochs of 188 steps, 85 s in all: not worth 180 s
    assert not devices.compile_pays(0.015, 30 * 188)
    # the break-even point: saved time equals the compile time
    steps = devices.COMPILE_SECONDS / (1 - 1 / devices.COMPILE_SPEEDUP)
    assert devices.compile_pays(1.0, steps + 1) and not devices.compile_pays(1.0, steps - 1)


def test_tracker_flag_on_an_untracked_run_is_refused(trained_run):
    tmp, _ = trained_run
    for script in (["evaluate.py", "--out", f"{tmp}/eval_t"], ["cam.py", "--pairs", "test"]):
        proc = run_py([*script, "--ckpt", f"{tmp}/run/best.pt", "--tracker"], check=False)
        assert proc.returncode != 0 and "its run was not tracked (tracker none)" in proc.stderr


def test_check_rehearses_the_run_and_refuses_a_batch_that_would_not_fit(tmp_path, synth_dir, capsys):
    cfg = tiny_config(tmp_path, synth_dir)
    out = run_py(["train.py", "--cfg", cfg, "--check", "--time-budget", "2s", "--gpu", "t4"]).stdout
    steps = re.search(r"the whole run \(3 epochs of (\d+) steps\) takes about", out)
    ms = float(re.search(r"on this CPU: (\d+) ms a step", out).group(1))
    assert steps and ms > 0 and re.search(r"(\d+) session\(s\) of the time budget 0m02s", out)
    memory = re.search(r"peak memory ([\d.]+) GiB per process, estimated for fp16 at batch (\d+): ([\d.]+) GiB and "
                       r"about ([\d.]+) for CUDA's context, NCCL and the allocator's reserve, of 14.6 GiB on the "
                       r"config's gpu t4: fits", out)
    peak, batch, estimated, rest = memory.groups()
    assert int(batch) == 16 + 2  # 4 families of two a batch, K = 2, and the one holding the triplet 2 images more
    assert float(peak) == pytest.approx(float(estimated) + float(rest), abs=0.011)
    assert not os.path.exists(tmp_path / "run")  # no checkpoint, no folder
    import train
    from errors import run_cli
    # one batch of every image at 224 px: the estimate refuses it before any step
    assert run_cli(train.main, ["--cfg", cfg, "--check", "--gpu", "2080ti", "--batch_size", "60000",
                                "--img_size", "224"]) == 1
    assert "batch_size 60000 does not fit the config's gpu 2080ti" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_step_resumes_with_its_gradient_scaler(precision, tmp_path, synth_dir):
    """Under fp16 the gradient scaler trains and is saved and restored; bf16 needs none. Run in this process."""
    import train
    from tracking import Tracker

    def start(argv):
        _, cfg, resume = train.configure(argv)
        procs = train.start_processes(cfg)
        return train.start_run(cfg, train.load_train_set(cfg, procs, resume), procs, resume)
    run = start(["--cfg", tiny_config(tmp_path, synth_dir, precision=precision, epochs=1)])
    batch = run.batches.epoch(0)[0]
    assert run.procs.precision == precision and run.scaler.is_enabled() == (precision == "fp16")
    before = {k: v.clone() for k, v in run.raw.trainable_state().items()}
    for _ in range(4):  # fp16: the scaler skips the steps whose gradients overflow, halving its scale each time
        assert math.isfinite(float(train.train_step(run, batch)))
    assert any(not torch.equal(before[k], v) for k, v in run.raw.trainable_state().items())
    run.tracker = Tracker()
    train.save_checkpoints(run, 0, {})
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]
    if precision == "fp16":
        assert saved["scale"] == run.scaler.get_scale() and math.log2(saved["scale"]).is_integer()
    else:
        assert saved == {}
    resumed = start(["--resume", str(tmp_path / "run" / "last.pt")])
    assert resumed.scaler.state_dict() == run.scaler.state_dict()
    assert float(train.train_step(resumed, batch)) == float(train.train_step(run, batch))


def epoch_lines(out):
    """(loss, val EER) of each epoch line a run printed."""
    return [(float(loss), float(eer)) for loss, eer in re.findall(r"^epoch \d+/\d+ \| loss ([\d.]+) \| val EER ([\d.]+)",
                                                                  out, re.M)]


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.xdist_group(m)) for m in METHOD_RUNS])
def test_each_method_learns_and_a_vanishing_learning_rate_does_not(method, tmp_path, synth_dir, train_once):
    """On the tiny set the default learning rate takes traits' and arcface's validation EER from about 0.35 untrained
    to under 0.1 in three epochs; promptcam's loss falls. At lr 1e-9 nothing moves (the loss by augmentation alone)."""
    learned = epoch_lines(train_once(**METHOD_RUNS[method])[2])
    frozen = epoch_lines(run_py(["train.py", "--cfg", tiny_config(tmp_path, synth_dir, epochs=2, lr=1e-9,
                                                                   **METHOD_RUNS[method])]).stdout)
    assert len(learned) == 3 and len(frozen) == 2
    assert frozen[0][1] == frozen[1][1] and abs(frozen[0][0] - frozen[1][0]) < 0.2, frozen  # augmentation alone
    if method == "promptcam":  # its loss falls (8.27 to 7.94 in three epochs), its twins do not yet separate
        assert learned[-1][0] < learned[0][0] - 0.25, learned
    else:
        assert learned[-1][1] < 0.1 < 0.3 < frozen[-1][1], (learned, frozen)
