"""Cross-validation over twin families (--folds K): every family validated exactly once and never split; each fold
a run that resumes like any other; the final run on every family carries the pooled out-of-fold threshold."""
import glob
import json
import os

import numpy as np
import pytest
import torch

import data
import evaluate
from checkpoints import read_training_checkpoint
from conftest import run_py, tiny_config, torchrun


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_validate_every_family_once_and_never_split_one(synth_dir, folds):
    split = data.load_split(f"{synth_dir}/train_info.json", f"{synth_dir}/train_pairs.json")
    cfg = {"folds": folds, "seed": 0, "val_families": 3}
    validated = []
    for fold in range(folds):
        train, val = data.validation_split(split, {**cfg, "fold": fold})
        assert sorted(train.ids + val.ids) == split.ids and not set(train.ids) & set(val.ids)
        assert any(len(f) > 1 for f in val.families)  # twin impostors in every fold
        for family in split.families:
            members = {split.ids[p] for p in family}
            assert members <= set(val.ids) or members.isdisjoint(val.ids), members
        validated += val.ids
    assert sorted(validated) == split.ids  # each person validated exactly once
    sizes = [len(data.validation_split(split, {**cfg, "fold": f})[1].families) for f in range(folds)]
    assert max(sizes) - min(sizes) <= 2  # twins and singles each dealt in turn
    assert data.validation_split(split, {**cfg, "fold": folds}) == (split, None)  # the final run: every family
    with pytest.raises(ValueError, match="twin families to deal"):
        data.validation_split(split, {**cfg, "folds": 1000, "fold": 0})


def pooled_out_of_fold(run_dir, synth_dir, folds):
    """The pooled out-of-fold EER of each epoch and their thresholds, recomputed from the folds' checkpoints."""
    split = data.load_split(f"{synth_dir}/train_info.json", f"{synth_dir}/train_pairs.json")
    scores, genuine = [], []
    for fold in range(folds):
        ckpt = read_training_checkpoint(os.path.join(run_dir, f"fold{fold}", "last.pt"))
        assert ckpt["config"]["fold"] == fold
        _, val = data.validation_split(split, ckpt["config"])
        scores.append(torch.stack(ckpt["val_scores"]).numpy())
        genuine.append(evaluate.protocol_pairs(val)[2] == evaluate.GENUINE)
    pooled, genuine = np.concatenate(scores, axis=1), np.concatenate(genuine)
    rocs = [evaluate.roc(epoch_scores, genuine) for epoch_scores in pooled]
    return [evaluate.eer(far, tar) for far, tar, _ in rocs], [evaluate.eer_threshold(*r) for r in rocs], split


def test_a_cross_validation_stopped_by_its_budget_continues_and_its_final_run_keeps_the_pooled_threshold(
        tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, epochs=2, folds=3)
    first = run_py(["train.py", "--cfg", cfg, "--time-budget", "0.01s"]).stdout
    assert "time budget: stopping before epoch 2 would pass it" in first and "fold 1 of 3 stopped early" in first
    assert f"python train.py --cfg {cfg} --time-budget 0.01s --resume auto" in first
    assert os.path.exists(tmp_path / "run" / "fold0" / "last.pt") and not os.path.exists(tmp_path / "run" / "fold1")

    second = run_py(["train.py", "--cfg", cfg, "--resume", "auto"]).stdout
    assert "fold0/last.pt: 1 of 2 epochs done" in second
    run_dir = str(tmp_path / "run")
    eers, thresholds, split = pooled_out_of_fold(run_dir, synth_dir, 3)
    best = int(np.argmin(eers))
    summary = json.load(open(tmp_path / "run" / "folds.json"))
    assert summary["epochs"] == best + 1 and summary["threshold"] == thresholds[best]
    assert second.count("epoch 1/2 |") == 2 + (best == 1)  # folds 2 and 3 from the start, and the final run
    assert [p["eer"] for p in summary["pooled_per_epoch"]] == pytest.approx(eers, abs=1e-12)
    lo, hi = summary["eer_interval"]
    assert lo <= summary["eer"] <= hi and summary["threshold_interval"][0] <= thresholds[best]
    final = read_training_checkpoint(os.path.join(run_dir, "final", "last.pt"))
    assert final["threshold"] == thresholds[best] and final["epoch"] == best and final["class_ids"] == split.ids
    assert not os.path.exists(os.path.join(run_dir, "final", "best.pt"))
    again = run_py(["train.py", "--cfg", cfg, "--resume", "auto"]).stdout  # every run done: the summary is reused
    assert "folds.json: the folds chose" in again and "cross-validation, 3 folds" not in again
    evaluated = run_py(["evaluate.py", "--ckpt", f"{run_dir}/final", "--out", str(tmp_path / "eval"),
                        "--bootstrap", "20"]).stdout
    assert f"at threshold {thresholds[best]:.4f} (the out-of-fold EER's of its cross-validation" in evaluated


def test_a_cross_validation_under_ddp_deals_every_run_to_both_processes(tmp_path, synth_dir):
    """torchrun with two processes: each fold and the final run trained by both (the rank 0 summary broadcast)."""
    cfg = tiny_config(tmp_path, synth_dir, epochs=1, folds=2)
    out = torchrun(["train.py", "--cfg", cfg]).stdout
    assert out.count("trainable weights identical on all 2 ranks") == 3
    summary = json.load(open(tmp_path / "run" / "folds.json"))
    final = read_training_checkpoint(str(tmp_path / "run" / "final" / "last.pt"))
    assert final["threshold"] == summary["threshold"] and len(final["rng"]) == 2 and summary["epochs"] == 1


def test_a_cross_validation_is_one_mlflow_parent_run_with_a_child_per_fold_and_the_final_run(tmp_path, synth_dir):
    """MLflow with no server: one store for the whole folder, the parent run logging the pooled figures."""
    from mlflow.tracking import MlflowClient
    cfg = tiny_config(tmp_path, synth_dir, epochs=1, folds=2, tracker="mlflow")
    run_py(["train.py", "--cfg", cfg])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/run/mlflow.db")  # the store of the whole folder
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent_id = json.load(open(tmp_path / "run" / "folds.json"))["tracker_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(runs) == 4 and len(children) == 3
    assert sorted(r.data.params["fold"] for r in children) == ["0", "1", "2"]  # two folds and the final run
    parent = client.get_run(parent_id)
    assert parent.data.params["folds"] == "2"
    assert {"oof_eer", "oof_threshold", "chosen_epochs"} <= set(parent.data.metrics)


def test_a_cross_validation_is_one_wandb_group(tmp_path, synth_dir):
    """W&B offline: the parent and every fold and final run in one group, the folder's, read back from the files."""
    from test_train import wandb_records
    cfg = tiny_config(tmp_path, synth_dir, epochs=1, folds=2, tracker="wandb", wandb_project="twins-test")
    run_py(["train.py", "--cfg", cfg], env={"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_SILENT": "true"})
    groups = {}
    for path in glob.glob(f"{tmp_path}/run/**/offline-run-*/run-*.wandb", recursive=True):
        runs = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
        groups[os.path.relpath(path, tmp_path / "run").split(os.sep)[0]] = runs[0].run_group
    assert groups == {name: str(tmp_path / "run") for name in ("wandb", "fold0", "fold1", "final")}
