import csv
import json
import os

import numpy as np
import pytest

import evaluate as ev
from conftest import run_py


def m(genuine, impostor, threshold=None, fars=(1e-1, 1e-2)):
    scores = np.array(genuine + impostor, dtype=float)
    labels = np.array([True] * len(genuine) + [False] * len(impostor))
    return ev.metrics(scores, labels, threshold, fars=fars)


def test_perfect_separation():
    r = m([3.0, 4.0, 5.0], [float(i) / 10 for i in range(20)], threshold=2.0)
    assert r["auc"] == 1.0 and r["eer"] == 0.0 and r["accuracy"] == 1.0
    assert r["tar_at_far"]["0.1"] == 1.0


def test_identical_scores_are_chance():
    r = m([0.5] * 4, [0.5] * 6, threshold=0.5)
    assert r["auc"] == 0.5 and r["eer"] == 0.5
    assert r["accuracy"] == pytest.approx(0.4)  # everything accepted: only the 4 genuine pairs are right


def test_ties_count_half():
    # genuine (1, 2) vs impostor (1, 0): pairs won 1 (tie: 0.5) + 1 + 1 + 1 of 4
    assert m([1.0, 2.0], [1.0, 0.0])["auc"] == pytest.approx(3.5 / 4)


def test_single_impostor():
    r = m([0.2, 0.6, 0.9], [0.5], fars=(1e-1,))
    assert r["auc"] == pytest.approx(2 / 3)
    assert r["eer"] == pytest.approx(1 / 3)
    assert r["tar_at_far"]["0.1"] is None  # one impostor cannot resolve a 10% false-accept rate


def test_tar_at_far_and_resolution():
    impostors = [i / 10 for i in range(10)]  # 0.0 .. 0.9
    r = m([0.95, 0.85, 0.05], impostors, fars=(1e-1, 1e-2))
    assert r["tar_at_far"]["0.1"] == pytest.approx(2 / 3)
    assert r["tar_at_far"]["0.01"] is None  # 10 impostor pairs: FAR 1e-2 is below resolution


def test_weights_equal_repetition():
    scores = np.array([0.9, 0.4, 0.7, 0.1, 0.5])
    labels = np.array([True, True, False, False, False])
    w = np.array([2, 1, 1, 3, 1], dtype=float)
    rep = np.repeat(np.arange(5), w.astype(int))
    a = ev.metrics(scores, labels, 0.45, w)
    b = ev.metrics(scores[rep], labels[rep], 0.45)
    for key in ("auc", "eer", "accuracy"):
        assert a[key] == pytest.approx(b[key])
    assert a["auc"] == pytest.approx(1 - 2 / 15)  # genuine 0.4 (x1) loses to 0.7 (x1) and 0.5 (x1) of 15 pairs


def test_eer_threshold_is_from_the_given_scores():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = np.array([True, True, True, False, False, False])
    far, tar, thr = ev.roc(scores, labels)
    t = ev.eer_threshold(far, tar, thr)
    assert t in scores and ev.accuracy(scores, labels, t) >= 4 / 6


def test_protocol_is_exhaustive_and_deterministic(synth_dir):
    import data
    split = data.load_split(f"{synth_dir}/test_info.json", f"{synth_dir}/test_pairs.json")
    a, b, kind, fa, fb = ev.protocol_pairs(split)
    n = len(split.paths)
    per_person = np.bincount(split.person.numpy())
    assert (kind == ev.GENUINE).sum() == sum(k * (k - 1) // 2 for k in per_person)
    twin_pairs = sum(per_person[f[0]] * per_person[f[1]] for f in split.families if len(f) == 2)
    assert (kind == ev.TWIN).sum() == twin_pairs and (fa == fb).all()
    a2, _, kind2, _, _ = ev.protocol_pairs(split, all_impostors=True)
    assert len(a2) == n * (n - 1) // 2 and (kind2 == ev.OTHER).sum() > 0


def test_evaluate_is_byte_identical_and_complete(trained_run):
    tmp, _ = trained_run
    outs = []
    for name in ("one", "two"):
        out = os.path.join(tmp, name)
        proc = run_py(["evaluate.py", "--ckpt", f"{tmp}/run/best.pt", "--out", out, "--all-impostors",
                       "--bootstrap", "200"])
        assert "encoding" in proc.stdout and "scoring" in proc.stdout
        outs.append(out)
    for f in ("metrics.json", "scores.csv"):
        assert open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[1], f), "rb").read()
    metrics = json.load(open(os.path.join(outs[0], "metrics.json")))
    assert {"auc", "eer", "tar_at_far", "accuracy", "threshold", "n_genuine", "n_twin", "intervals"} <= set(metrics)
    assert metrics["threshold"] is not None and set(metrics["tar_at_far"]) == {"0.1", "0.01", "0.001"}
    assert "0.0001" in metrics["all_impostors"]["tar_at_far"]
    lo, hi = metrics["intervals"]["eer"]
    assert lo <= metrics["eer"] <= hi
    with open(os.path.join(outs[0], "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path_a", "path_b", "label", "kind", "score"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"genuine", "twin", "other"}
    assert sum(r["kind"] == "genuine" for r in rows) == metrics["n_genuine"]
    assert sum(r["kind"] == "twin" for r in rows) == metrics["n_twin"]
    from PIL import Image
    assert Image.open(os.path.join(outs[0], "roc.png")).size[0] > 1000


def test_cls_baseline_runs_on_the_same_protocol(trained_run):
    tmp, _ = trained_run
    out = os.path.join(tmp, "baseline")
    proc = run_py(["evaluate.py", "--ckpt", f"{tmp}/run/best.pt", "--out", out, "--baseline", "cls",
                   "--bootstrap", "100"])
    assert "CLS cosine baseline" in proc.stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    reference = json.load(open(os.path.join(tmp, "one", "metrics.json"))) if os.path.exists(
        os.path.join(tmp, "one")) else metrics
    assert metrics["n_genuine"] == reference["n_genuine"] and -1 <= metrics["threshold"] <= 1


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"junk")
    proc = run_py(["evaluate.py", "--ckpt", str(tmp_path / "x.pt"), "--out", str(tmp_path)], check=False)
    assert proc.returncode != 0 and "x.pt" in proc.stderr


def test_auc_and_eer_agree_with_a_brute_force_count_over_weighted_tied_scores():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 300) / 20.0  # many ties
    genuine = rng.random(300) < 0.3
    scores[genuine] += 0.2
    weights = rng.integers(1, 4, 300).astype(float)
    r = ev.metrics(scores, genuine, None, weights)
    g, i = np.flatnonzero(genuine), np.flatnonzero(~genuine)
    wins = (scores[g][:, None] > scores[i][None]) + 0.5 * (scores[g][:, None] == scores[i][None])
    pair_weights = weights[g][:, None] * weights[i][None]
    assert r["auc"] == pytest.approx((wins * pair_weights).sum() / pair_weights.sum())
    # at every threshold t (same if score >= t): FAR and FRR by counting; the EER lies where they cross
    far = [(weights[i] * (scores[i] >= t)).sum() / weights[i].sum() for t in np.unique(scores)]
    frr = [(weights[g] * (scores[g] < t)).sum() / weights[g].sum() for t in np.unique(scores)]
    k = int(np.argmax(np.array(far) <= np.array(frr)))  # FAR falls and FRR rises with t: they cross before t_k
    assert k > 0 and max(far[k], frr[k - 1]) - 1e-9 <= r["eer"] <= min(far[k - 1], frr[k]) + 1e-9


def test_protocol_counts_a_triplet_family_as_three_twin_pairs():
    import torch
    import data
    n = {0: 3, 1: 2, 2: 4, 3: 2, 4: 5}  # a triplet (0, 1, 2), twins (3, 4)
    person = [p for p, k in n.items() for _ in range(k)]
    split = data.Split(ids=[str(p) for p in n], paths=[f"{i}.jpg" for i in range(len(person))],
                       person=torch.tensor(person), families=[[0, 1, 2], [3, 4]])
    _, _, kind, fam_a, fam_b = ev.protocol_pairs(split)
    assert (kind == ev.GENUINE).sum() == 3 + 1 + 6 + 1 + 10
    assert (kind == ev.TWIN).sum() == 3 * 2 + 3 * 4 + 2 * 4 + 2 * 5
    assert (fam_a == fam_b).all()
    _, _, everything, _, _ = ev.protocol_pairs(split, all_impostors=True)
    assert (everything == ev.OTHER).sum() == (3 + 2 + 4) * (2 + 5)
