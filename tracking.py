"""Experiment tracking picked by flag: `none`, `mlflow` or `wandb`. Rank 0 only.

A tracker that cannot start or stops working (server down, no key) warns once and training goes on.
Nothing leaves the machine unless a tracker was chosen; MLflow's own telemetry is switched off. mlflow and wandb are
imported only by the tracker that uses them: each takes seconds, and a run that tracks nothing needs neither.
"""
import os
import pathlib
import time
import warnings

from errors import UserError


class Tracker:
    """No tracking; the interface every tracker has."""
    kind = "none"
    run_id = None
    group = None  # a cross-validation's folder: W&B groups its runs by it, MLflow keeps its local store there

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, epoch):
        pass

    def log_image(self, key, image, epoch):
        """A PIL image under key at an epoch (ROC curves, explanation figures)."""

    def finish(self):
        pass


class MLflowTracker(Tracker):
    kind = "mlflow"

    def __init__(self, cfg, run_id, parent_run_id=None, group=None):
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        # fail in seconds, not minutes, when the server is down (the user's environment wins)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow.tracking import MlflowClient
        uri = cfg["mlflow_uri"] or os.environ.get("MLFLOW_TRACKING_URI")
        # with no server named, the store and the figures stay in out_dir (MLflow would put figures in ./mlruns); a
        # cross-validation's runs share the store of its folder (the group)
        out_dir = os.path.abspath(group or cfg["out_dir"])
        artifacts = None if uri else pathlib.Path(out_dir, "mlartifacts").as_uri()
        uri = uri or "sqlite:///" + os.path.join(out_dir, "mlflow.db")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id:  # a resumed run continues the same MLflow run
            self.run_id = self.client.get_run(run_id).info.run_id
        else:
            name = cfg["mlflow_experiment"] or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "twin-verification"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(name, artifact_location=artifacts))
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None  # a fold under its cross-validation
            self.run_id = self.client.create_run(experiment_id, run_name=cfg["run_name"] or None, tags=tags).info.run_id
        self.uri, self.group = uri, group

    def log_params(self, params):
        from mlflow.entities import Param
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in sorted(params.items())])

    def log_metrics(self, metrics, epoch):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])

    def log_image(self, key, image, epoch):
        self.client.log_image(self.run_id, image, artifact_file=f"{key}/epoch_{epoch:03d}.png")

    def finish(self):
        self.client.set_terminated(self.run_id)


def kaggle_secret(name):
    """A Kaggle secret, when running on Kaggle with it attached; None elsewhere."""
    try:
        from kaggle_secrets import UserSecretsClient
    except ImportError:
        return None
    try:
        return UserSecretsClient().get_secret(name)
    except Exception:
        return None


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, cfg, run_id, parent_run_id=None, group=None):
        import wandb
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")
        if not offline and not os.environ.get("WANDB_API_KEY"):
            key = kaggle_secret("WANDB_API_KEY")
            if not key:
                raise RuntimeError("no W&B API key: set WANDB_API_KEY, attach a Kaggle secret named "
                                   "WANDB_API_KEY, or set WANDB_MODE=offline")
            os.environ["WANDB_API_KEY"] = key  # this process only; never written to disk
        # id None starts a new run; its id goes into the checkpoint and is resumed from there
        self.run = wandb.init(project=cfg["wandb_project"], entity=cfg["wandb_entity"] or None,
                              name=cfg["run_name"] or None, id=run_id, resume="allow", dir=cfg["out_dir"], config=cfg,
                              group=group, reinit="create_new")  # beside a cross-validation's parent run
        self.group = group
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        self.run_id = self.run.id

    def log_metrics(self, metrics, epoch):
        self.run.log({**metrics, "epoch": epoch})

    def log_image(self, key, image, epoch):
        import wandb
        self.run.log({key: wandb.Image(image), "epoch": epoch})

    def finish(self):
        self.run.finish()


class Guarded(Tracker):
    """Forwards to a tracker; on its first failure warns once and stops tracking."""

    def __init__(self, tracker):
        self.tracker, self.kind, self.run_id, self.group = tracker, tracker.kind, tracker.run_id, tracker.group

    def _call(self, name, *args):
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, name)(*args)
        except Exception as e:
            warnings.warn(f"{self.kind} tracking failed ({type(e).__name__}: {e}); training goes on untracked")
            self.tracker = None

    def log_params(self, params):
        self._call("log_params", params)

    def log_metrics(self, metrics, epoch):
        self._call("log_metrics", metrics, epoch)

    def log_image(self, key, image, epoch):
        self._call("log_image", key, image, epoch)

    def finish(self):
        self._call("finish")


def tracker_of_checkpoint(ckpt, path):
    """The tracker of the run that wrote a checkpoint, continuing that run (evaluate.py and cam.py --tracker)."""
    if ckpt["config"]["tracker"] == "none" or not ckpt.get("tracker_run_id"):
        raise UserError(f"{path}: its run was not tracked (tracker none), so --tracker has no run to log to")
    return make_tracker(ckpt["config"], ckpt["tracker_run_id"])


def make_tracker(cfg, run_id=None, rank=0, parent=None, group=None):
    """The tracker cfg['tracker'] names, resuming run_id; a plain Tracker on other ranks or on failure. A run of a
    cross-validation is tracked under its parent: an MLflow child run, or a W&B run in the parent's group."""
    kinds = {"none": Tracker, "mlflow": MLflowTracker, "wandb": WandbTracker}
    if rank != 0 or cfg["tracker"] == "none":
        return Tracker()
    try:
        return Guarded(kinds[cfg["tracker"]](cfg, run_id, parent and parent.run_id, group or (parent and parent.group)))
    except Exception as e:
        warnings.warn(f"{cfg['tracker']} tracking unavailable ({type(e).__name__}: {e}); training goes on untracked")
        return Tracker()

