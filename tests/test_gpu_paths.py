"""What a first GPU run would meet and a CPU run does not show, guarded on the CPU: graph breaks under torch.compile,
16-bit cosines in the margin loss, host syncs in the step, the scaler's skipped step, the compile policy per GPU
generation, the build check, and the processes' patience with rank 0."""
import inspect
import os
import re
from datetime import timedelta

import pytest
import torch

import devices
import train
from conftest import ROOT, tiny_config
from test_model import trained_like

METHODS = ["traits", "arcface", "promptcam"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_methods_training_forward_compiles_without_a_graph_break(method, precision):
    import torch._dynamo
    m = trained_like(method).train()
    x, labels = torch.randn(4, 3, 56, 56), torch.tensor([0, 0, 1, 1])

    def loss(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return sum(m.loss_terms(m(x), labels).values())
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("method", ["traits", "arcface"])
def test_the_margins_cosines_are_fp32_under_16_bit_autocast(method):
    m = trained_like(method).eval()
    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb, cos = m(x)
    assert emb.dtype == cos.dtype == torch.float32
    exact = emb @ torch.nn.functional.normalize(m.class_centres.float(), dim=-1).T  # fp32, outside autocast
    torch.testing.assert_close(cos, exact, atol=1e-6, rtol=0)  # bf16 would be off by ~4e-3 near 1


def start_tiny_run(tmp_path, synth_dir, **overrides):
    _, cfg, resume = train.configure(["--cfg", tiny_config(tmp_path, synth_dir, **overrides)])
    procs = train.start_processes(cfg)
    return train.start_run(cfg, train.load_train_set(cfg, procs, resume), procs, resume)


# Each of these reads a tensor back to the host (a sync on a GPU); torch.tensor copies host data to the device.
HOST_READS = {torch.Tensor: ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"),
              torch: ("tensor",)}


def test_a_training_step_reads_nothing_back_to_the_host(tmp_path, synth_dir, monkeypatch):
    """Anything of ours that the step calls (train.py, data.py, model.py, evaluate.py, devices.py) neither reads a
    tensor back nor copies host data to the device; torch's own optimiser is fused on a GPU and reads nothing back
    there."""
    run = start_tiny_run(tmp_path, synth_dir, epochs=1)
    batches = run.batches.epoch(0)
    train.train_step(run, batches[0])  # the first step makes what is made once (the normalisation constants)
    ours = {os.path.join(ROOT, f) for f in ("train.py", "data.py", "model.py", "evaluate.py", "devices.py")}
    calls = []
    for owner, names in HOST_READS.items():
        for name in names:
            original = getattr(owner, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                caller = inspect.currentframe().f_back.f_code.co_filename
                if caller in ours:
                    calls.append((_name, caller))
                return _original(*args, **kwargs)
            monkeypatch.setattr(owner, name, counted)
    loss = train.train_step(run, batches[1])
    monkeypatch.undo()
    assert calls == [] and loss.ndim == 0


def test_the_fused_optimiser_under_a_gradient_scaler_skips_a_step_with_an_inf_gradient():
    m = trained_like("traits").train()
    optimizer = train.make_optimizer(m, {"weight_decay": 0.05, "lr": 1e-3}, fused=True)
    assert all(group["fused"] for group in optimizer.param_groups)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    loss = sum(m.loss_terms(m(torch.randn(4, 3, 56, 56)), torch.tensor([0, 0, 1, 1])).values())
    scaler.scale(loss).backward()
    m.trait_prompts.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters() if p.requires_grad)
    assert scaler.get_scale() == 2.0 ** 9 and not optimizer.state[m.trait_prompts]["step"]
    optimizer.zero_grad()  # and a finite step goes through
    scaler.scale(sum(m.loss_terms(m(torch.randn(4, 3, 56, 56)), torch.tensor([0, 0, 1, 1])).values())).backward()
    scaler.step(optimizer)
    assert not torch.equal(m.trait_prompts, before["trait_prompts"])


def fake_gpu(monkeypatch, capability, archs=("sm_75", "sm_80", "sm_86", "sm_90")):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"a GPU of sm_{capability[0]}{capability[1]}")
    return torch.device("cuda", 0)


@pytest.mark.parametrize("capability,expected", [((6, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_compile_auto_is_on_only_where_its_speed_up_was_measured(capability, expected, monkeypatch):
    device = fake_gpu(monkeypatch, capability)
    timed, lines = [], []

    def time_step():
        timed.append(1)
        return 1.0  # a long step: compiling pays wherever it is considered
    assert devices.resolve_compile({"compile": "auto"}, device, time_step, 3600, lines.append) == expected
    assert bool(timed) == expected  # below sm_80 not even an uncompiled step is timed
    assert ("no measurement shows it pays" in lines[0]) != expected
    assert devices.resolve_compile({"compile": "true"}, device, time_step, 1, lines.append)  # the config decides
    assert not devices.resolve_compile({"compile": "false"}, device, time_step, 10 ** 6, lines.append)


def test_a_torch_without_kernels_for_the_gpu_stops_naming_a_build_that_has_them(monkeypatch):
    device = fake_gpu(monkeypatch, (6, 0))  # a P100 under a build from sm_75 up
    with pytest.raises(SystemExit) as stop:
        devices.check_gpu_support(device)
    assert "is sm_60" in str(stop.value) and "https://download.pytorch.org/whl/cu126" in str(stop.value)
    devices.check_gpu_support(fake_gpu(monkeypatch, (6, 0), ("sm_50", "sm_60", "sm_70", "sm_75")))  # cu126's list
    devices.check_gpu_support(fake_gpu(monkeypatch, (6, 1), ("sm_60", "sm_70")))  # a P40 runs sm_60 code
    devices.check_gpu_support(fake_gpu(monkeypatch, (9, 0), ("sm_80", "compute_80")))  # PTX compiles for newer GPUs
    with pytest.raises(SystemExit):
        devices.check_gpu_support(fake_gpu(monkeypatch, (7, 0), ("sm_75", "sm_80", "compute_80")))


def test_the_processes_wait_an_hour_for_rank_0s_work(monkeypatch):
    """A one-process group as torchrun starts it: its timeout is the hour that rank 0's cache, download and
    validation may take (NCCL's default is 10 minutes)."""
    import torch.distributed as dist
    from conftest import free_port
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        procs = train.start_processes({"precision": "auto"})
        assert procs.ddp and procs.world == 1
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))  # gloo, as on a CPU
        assert backend.options._timeout == timedelta(hours=1)
    finally:
        dist.destroy_process_group()


def test_ddp_compiled_matches_eager_and_compiles_once_per_batch_shape(tmp_path, synth_dir):
    """Two processes over gloo, the backbone frozen (as every GPU config), one epoch with torch.compile (aot_eager:
    dynamo's graphs and AOT autograd, no kernels generated) against the same epoch eager: the same weights, and each
    rank compiles one graph per batch size it meets (the batches of two families, and those holding the triplet)."""
    from conftest import torchrun
    cfg = tiny_config(tmp_path, synth_dir, epochs=1, train_blocks=0)
    weights, compiled = {}, None
    for mode in ("true", "false"):
        out = torchrun(["tests/ddp_compile_run.py", "--cfg", cfg, "--compile", mode, "--out_dir",
                        str(tmp_path / mode)]).stdout
        weights[mode] = torch.load(tmp_path / mode / "last.pt", weights_only=True)["model"]
        if mode == "true":
            compiled = [int(n) for n in re.findall(r"frames compiled (\d+), recompiles", out)]
    assert len(compiled) == 2 and all(1 <= n <= 2 for n in compiled), compiled
    for name, value in weights["false"].items():
        torch.testing.assert_close(weights["true"][name], value, atol=1e-6, rtol=0)
