"""The user's own commands: the design card's three lines, resuming with another number of processes, one command line
for every Kaggle session, run folders as --ckpt, and the summary a run ends with."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port, run_py, tiny_config


def torchrun(args, cwd=ROOT, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def adam_steps(ckpt):
    return {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}


def steps_per_epoch(output, epoch, epochs):
    """The batches a process took in an epoch, as its progress bar printed them."""
    return int(re.findall(rf"epoch {epoch}/{epochs} \[#+\] (\d+)/\d+", output)[-1])


def test_the_design_cards_three_lines_run_as_written(tmp_path, synth_dir):
    """torchrun with two processes, `python train.py --resume ckpt/last.pt` with one, `python cam.py a.jpg b.jpg`:
    from the folder the user works in, with no other flag (the first line stops after an epoch by its budget)."""
    (tmp_path / "configs").mkdir()
    cfg = tiny_config(tmp_path, synth_dir, epochs=2, out_dir="ckpt")
    shutil.move(cfg, tmp_path / "configs" / "t4x2.yaml")
    for script in ("train.py", "cam.py"):
        os.symlink(os.path.join(ROOT, script), tmp_path / script)
    first = torchrun(["train.py", "--cfg", "configs/t4x2.yaml", "--time-budget", "1s"], cwd=tmp_path).stdout
    assert "stopping before epoch 2" in first and "--resume auto" in first
    written = state(tmp_path / "ckpt" / "last.pt")
    assert written["epoch"] == 0 and len(written["rng"]) == 2

    second = run_py(["train.py", "--resume", "ckpt/last.pt"], cwd=tmp_path).stdout
    assert "was written by 2 process(es) and resumes with 1" in second and "no longer bit-identical" in second
    assert "epoch 2/2 |" in second and "epoch 1/2 |" not in second
    resumed = state(tmp_path / "ckpt" / "last.pt")
    one, two = steps_per_epoch(second, 2, 2), written["step"]
    assert one > two  # one process takes every batch of the epoch, each of two about half of them
    # the schedule stands where one process would be after two epochs; Adam counts the steps it took
    assert resumed["epoch"] == 1 and len(resumed["rng"]) == 1 and resumed["step"] == 2 * one
    assert resumed["scheduler"]["last_epoch"] == resumed["step"] and adam_steps(resumed) == {two + one}

    pictures = [synth_dir + "/images/10203/10203d0.jpg", synth_dir + "/images/10204/10204d0.jpg"]
    for name, picture in zip(("a.jpg", "b.jpg"), pictures):
        shutil.copy(picture, tmp_path / name)
    third = run_py(["cam.py", "a.jpg", "b.jpg"], cwd=tmp_path).stdout
    assert f"using {os.path.join('ckpt', 'best.pt')}" in third and "verdict:" in third
    assert os.path.getsize(tmp_path / "pair.png") > 10_000


def test_one_process_run_continues_on_two(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, epochs=2)
    run_py(["train.py", "--cfg", cfg, "--time-budget", "1s"])
    written = state(tmp_path / "run" / "last.pt")
    out = torchrun(["train.py", "--resume", str(tmp_path / "run" / "last.pt")]).stdout
    assert "was written by 1 process(es) and resumes with 2" in out and "epoch 2/2 |" in out
    resumed = state(tmp_path / "run" / "last.pt")
    one, two = written["step"], steps_per_epoch(out, 2, 2)
    assert resumed["epoch"] == 1 and len(resumed["rng"]) == 2 and two < one
    assert resumed["step"] == 2 * two and resumed["scheduler"]["last_epoch"] == resumed["step"]
    assert adam_steps(resumed) == {one + two}
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine's end


def test_resume_auto_takes_this_runs_newest_checkpoint_from_a_previous_session(tmp_path, synth_dir):
    """A new Kaggle session: out_dir is empty, the previous session's output is mounted read-only under the folder
    resume_dirs names, beside another run's checkpoints."""
    first = tmp_path / "earlier_session"
    first.mkdir()
    run_py(["train.py", "--cfg", tiny_config(first, synth_dir, epochs=3), "--time-budget", "1s"])
    other = tmp_path / "other"
    other.mkdir()
    run_py(["train.py", "--cfg", tiny_config(other, synth_dir, epochs=2, lr=0.001)])
    mounted = tmp_path / "input"
    shutil.copytree(first / "run", mounted / "my-notebook" / "ckpt")
    shutil.copytree(other / "run", mounted / "older-notebook" / "ckpt")  # epoch 1 of another run: higher, not ours
    work = tmp_path / "working"
    work.mkdir()
    cfg = tiny_config(work, synth_dir, epochs=3, resume_dirs=str(mounted))
    out = run_py(["train.py", "--cfg", cfg, "--resume", "auto", "--time-budget", "1s"]).stdout
    assert f"resumed {mounted}/my-notebook/ckpt/last.pt: 1 of 3 epochs done" in out
    assert "checkpoint(s) of other runs left alone" in out and "older-notebook" in out
    assert state(work / "run" / "last.pt")["epoch"] == 1

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    out = run_py(["train.py", "--cfg", tiny_config(fresh, synth_dir, epochs=1, resume_dirs=str(tmp_path / "none")),
                  "--resume", "auto"]).stdout
    assert f"--resume auto: no checkpoint of this run in {fresh}/run, {tmp_path}/none; starting fresh" in out


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, epochs=3)
    run_py(["train.py", "--cfg", cfg, "--epochs", "2"])
    run_dir = tmp_path / "run"
    assert state(run_dir / "previous.pt")["epoch"] == 0 and state(run_dir / "last.pt")["epoch"] == 1
    with open(run_dir / "last.pt", "r+b") as f:
        f.truncate(1000)
    out = run_py(["train.py", "--cfg", cfg, "--resume", "auto"]).stdout
    assert f"--resume auto: skipping {run_dir}/last.pt: cannot read checkpoint" in out
    assert f"resumed {run_dir}/previous.pt: 1 of 3 epochs done" in out and "epoch 2/3 |" in out
    assert state(run_dir / "last.pt")["epoch"] == 2


def test_a_fresh_run_never_overwrites_a_run(trained_run):
    tmp, cfg = trained_run
    before = os.path.getmtime(f"{tmp}/run/last.pt")
    proc = run_py(["train.py", "--cfg", cfg], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"{tmp}/run/last.pt holds a run already; continue it with `python train.py --resume "
                                   f"{tmp}/run/last.pt` (or `--resume auto`), or start this one elsewhere with "
                                   f"`--out_dir OTHER`")
    assert os.path.getmtime(f"{tmp}/run/last.pt") == before and "decoding" not in proc.stdout


def test_a_run_ends_with_a_summary_of_commands_that_work(trained_run, tmp_path):
    """The summary's next commands, run as printed."""
    tmp, cfg = trained_run
    out = run_py(["train.py", "--resume", f"{tmp}/run"]).stdout  # every epoch done: the summary alone
    assert "all 2 epochs were done already" in out
    ckpt = state(f"{tmp}/run/best.pt")
    assert f"done: best epoch {ckpt['best_epoch'] + 1}, validation EER {ckpt['best_eer']:.4f}" in out
    commands = [line.split() for line in out.split("next:\n")[1].splitlines() if line.startswith("  python ")]
    assert [c[1] for c in commands] == ["evaluate.py", "cam.py", "cam.py"]
    for _, script, *args in commands:  # from another folder, where their outputs land
        proc = run_py([os.path.join(ROOT, script), *args, *(["--n", "2"] if "--pairs" in args else [])], cwd=tmp_path)
        assert f"using {tmp}/run/best.pt" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["cam_gallery", "eval", "pair.png"]
    assert os.path.exists(tmp_path / "eval" / "metrics.json") and os.path.exists(tmp_path / "cam_gallery" / "index.html")
