"""The user's own commands: the design card's three lines, resuming with another number of processes, one command line
for every Kaggle session, run folders as --ckpt, and the summary a run ends with."""
import os
import re
import shutil

import pytest
import torch

from conftest import ROOT, run_py, save_edited_checkpoint, tiny_config, torchrun


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
    first = torchrun(["train.py", "--cfg", "configs/t4x2.yaml", "--time-budget", "0.01s"], cwd=tmp_path).stdout
    assert "time budget: stopping before epoch 2 would pass it" in first and "epoch 2/2 |" not in first
    assert "torchrun --nproc_per_node 2 train.py --cfg configs/t4x2.yaml --time-budget 0.01s --resume auto" in first
    assert "stopped early: best epoch 1" in first
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


def test_one_process_run_continues_on_two(tmp_path, trained_run):
    (tmp_path / "run").mkdir()
    shutil.copy(f"{trained_run[0]}/run/previous.pt", tmp_path / "run" / "last.pt")  # two of three epochs done
    written = state(tmp_path / "run" / "last.pt")
    out = torchrun(["train.py", "--resume", str(tmp_path / "run" / "last.pt"), "--out_dir", str(tmp_path / "run")]).stdout
    assert "was written by 1 process(es) and resumes with 2" in out and "epoch 3/3 |" in out
    resumed = state(tmp_path / "run" / "last.pt")
    one, two = written["step"] // 2, steps_per_epoch(out, 3, 3)
    assert resumed["epoch"] == 2 and len(resumed["rng"]) == 2 and two < one
    assert resumed["step"] == 3 * two and resumed["scheduler"]["last_epoch"] == resumed["step"]
    assert adam_steps(resumed) == {written["step"] + two}
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine's end


def test_resume_auto_takes_this_runs_newest_checkpoint_from_a_previous_session(tmp_path, synth_dir, trained_run,
                                                                              capsys):
    """A new Kaggle session: out_dir is empty, the previous session's output is mounted read-only under the folder
    resume_dirs names, beside another run's checkpoints."""
    import train
    mounted = tmp_path / "input"
    (mounted / "my-notebook" / "ckpt").mkdir(parents=True)
    (mounted / "older-notebook" / "ckpt").mkdir(parents=True)
    shutil.copy(f"{trained_run[0]}/run/previous.pt", mounted / "my-notebook" / "ckpt" / "last.pt")  # 2 of 3 epochs
    other = state(f"{trained_run[0]}/run/last.pt")
    other["config"]["lr"] = 0.001  # another run, with a higher epoch
    save_edited_checkpoint(other, mounted / "older-notebook" / "ckpt" / "last.pt")
    work = tmp_path / "working"
    work.mkdir()
    cfg = tiny_config(work, synth_dir, resume_dirs=str(mounted))
    out = run_py(["train.py", "--cfg", cfg, "--resume", "auto"]).stdout
    assert f"resumed {mounted}/my-notebook/ckpt/last.pt: 2 of 3 epochs done" in out
    assert "checkpoint(s) of other runs left alone" in out and "older-notebook" in out
    assert "epoch 3/3 |" in out and state(work / "run" / "last.pt")["epoch"] == 2

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    train.main(["--cfg", tiny_config(fresh, synth_dir, epochs=1, resume_dirs=str(tmp_path / "none")),
                "--resume", "auto"])
    out = capsys.readouterr().out
    assert f"--resume auto: no checkpoint of this run in {fresh}/run, {tmp_path}/none; starting fresh" in out
    assert state(fresh / "run" / "last.pt")["epoch"] == 0


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, synth_dir, trained_run):
    shutil.copytree(f"{trained_run[0]}/run", tmp_path / "run")
    run_dir = tmp_path / "run"
    assert state(run_dir / "previous.pt")["epoch"] == 1 and state(run_dir / "last.pt")["epoch"] == 2
    with open(run_dir / "last.pt", "r+b") as f:
        f.truncate(1000)
    out = run_py(["train.py", "--cfg", tiny_config(tmp_path, synth_dir), "--resume", "auto"]).stdout
    assert f"--resume auto: skipping {run_dir}/last.pt: cannot read checkpoint" in out
    assert f"resumed {run_dir}/previous.pt: 2 of 3 epochs done" in out and "epoch 3/3 |" in out
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
    assert "all 3 epochs were done already" in out
    ckpt = state(f"{tmp}/run/best.pt")
    assert f"done: best epoch {ckpt['best_epoch'] + 1}, validation EER {ckpt['best_eer']:.4f}" in out
    commands = [line.split() for line in out.split("next:\n")[1].splitlines() if line.startswith("  python ")]
    assert [c[1] for c in commands] == ["evaluate.py", "cam.py", "cam.py"]
    for _, script, *args in commands:  # from another folder, where their outputs land
        proc = run_py([os.path.join(ROOT, script), *args, *(["--n", "2"] if "--pairs" in args else [])], cwd=tmp_path)
        assert f"using {tmp}/run/best.pt" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["cam_gallery", "eval", "pair.png"]
    assert os.path.exists(tmp_path / "eval" / "metrics.json") and os.path.exists(tmp_path / "cam_gallery" / "index.html")
