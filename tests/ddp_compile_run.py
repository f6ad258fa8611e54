"""One epoch of train.py in this process, as torchrun starts it, with torch.compile's backend set to aot_eager (the
graph capture and autograd of inductor, without generating kernels, so a CPU runs it in seconds). Prints each rank's
count of compiled graphs and recompilations. Used by tests/test_gpu_paths.py."""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch._dynamo.utils  # noqa: E402

import train  # noqa: E402
from errors import run_cli  # noqa: E402

torch.compile = functools.partial(torch.compile, backend="aot_eager")
status = run_cli(train.main, sys.argv[1:])
stats = torch._dynamo.utils.counters["stats"]
print(f"rank {os.environ.get('RANK')}: frames compiled {stats['unique_graphs']}, "
      f"recompiles {sum(torch._dynamo.utils.counters['recompiles'].values())}", flush=True)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
sys.exit(status)
