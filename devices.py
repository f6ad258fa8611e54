"""What the hardware decides: the GPUs the configs are written for, the precision and autocast a device trains in,
whether the installed torch runs on the GPU, whether torch.compile pays, and peak memory."""
import resource

import torch

# The GPUs of the shipped configs: memory as torch reports it (GiB), and the precision `auto` picks on them (bf16 from
# sm_80 on, else fp16 with a gradient scaler).
GPUS = {"t4": (14.6, "fp16"), "p100": (15.9, "fp16"), "2080ti": (10.7, "fp16"), "a100": (39.4, "bf16"),
        "h100": (79.1, "bf16")}


def default_precision(device):
    """fp32 on CPU; bf16 on GPUs with native bf16 (sm_80+); fp16 below (T4, 2080 Ti, P100)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def named_gpu(cfg):
    """(memory GiB or None, precision) of the GPU the config's `gpu` key names, the precision as the run would pick
    it there."""
    capacity, gpu_precision = GPUS.get(cfg["gpu"], (None, "fp32"))
    return capacity, gpu_precision if cfg["precision"] == "auto" else cfg["precision"]


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def check_gpu_support(device):
    """Stop early when the installed torch has no kernels for this GPU (e.g. a P100 with a recent build)."""
    major, minor = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    ok = any(a.startswith("sm_") and int(a[3:].rstrip("a")) // 10 == major and int(a[3:].rstrip("a")) % 10 <= minor
             for a in archs) or any(a.startswith("compute_") and int(a[8:].rstrip("a")) <= major * 10 + minor
                                    for a in archs)
    if not ok:
        raise SystemExit(
            f"this torch {torch.__version__} (CUDA {torch.version.cuda}) has kernels for {' '.join(archs)}, but "
            f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}. Install a build that includes it: for a "
            f"P100 (sm_60), PyTorch's CUDA 12.6 builds (the cu128 and later ones have no sm_60): "
            f"pip install torch --index-url https://download.pytorch.org/whl/cu126")


# torch.compile pays back when the step time it saves over the run exceeds the time compiling takes. Measured on
# an H100 (sm_90): compiled ViT-B/14 steps ran 1.8x faster (986 vs 541 images/s), and the demo config's graphs took
# 73 s to compile; Kaggle's 2-4-core hosts compile more slowly, hence 180 s. Below sm_80 nothing was measured: a T4's
# or a 2080 Ti's step is mostly cuBLAS and memory-efficient attention, and a Kaggle session starts with an empty
# compile cache, so `auto` leaves those uncompiled (a P100, sm_60, has no Triton at all).
COMPILE_SPEEDUP, COMPILE_SECONDS, COMPILE_MEASURED_FROM = 1.8, 180.0, (8, 0)


def compile_pays(step_seconds, steps_left):
    """Whether compiling saves more time over the steps left than it costs."""
    return steps_left * step_seconds * (1 - 1 / COMPILE_SPEEDUP) > COMPILE_SECONDS


def resolve_compile(cfg, device, time_step, steps_left, log):
    """compile true/false as set; auto: on a GPU of the generations where the speed-up was measured (sm_80 on), when
    compile_pays for the steps this run has left, from an uncompiled step timed now."""
    if cfg["compile"] != "auto" or device.type != "cuda":
        return cfg["compile"] == "true"
    capability = torch.cuda.get_device_capability(device)
    if capability < COMPILE_MEASURED_FROM:
        log(f"compile auto: off on sm_{capability[0]}{capability[1]}: no measurement shows it pays below "
            f"sm_{COMPILE_MEASURED_FROM[0]}{COMPILE_MEASURED_FROM[1]} (compile: true turns it on)")
        return False
    seconds = time_step()
    pays = compile_pays(seconds, steps_left)
    log(f"compile auto: an uncompiled step takes {1000 * seconds:.0f} ms and {steps_left} steps are left, so "
        f"compiling ({COMPILE_SECONDS:.0f} s, {COMPILE_SPEEDUP}x faster steps) {'pays' if pays else 'does not pay'}")
    return pays


def peak_memory_gb(device):
    """Peak GPU memory allocated, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
