"""Run a training script as `python script.py ARGS` would, recording what the precision and placement tests check
(tests/test_precision.py); not a test module itself.

    python tests/placement_recorder.py RECORD.jsonl SCRIPT.py ARGS...

Appends one JSON line per event to RECORD.jsonl, at once (under torchrun the scripts end with os._exit):
- {"shard": class name} for every fully_shard call;
- {"move": class name, "plain": [names]} for every Module.to / Module.cuda that names a device, with the parameters
  that are not DTensors (not sharded) at that moment;
- {"autocast": device type, "dtype": dtype} for every torch.autocast made enabled;
- {"step": n, "params": [dtypes], "unsharded": count, "state": [dtypes]} after the first two optimizer steps: the
  dtypes of the trained parameters, how many of them are not DTensors, and the dtypes of the AdamW state.
"""

import json
import runpy
import sys

import torch
import torch.distributed.fsdp
from torch.distributed.tensor import DTensor

record_path, script, *script_args = sys.argv[1:]


def record(event):
    with open(record_path, "a") as f:
        f.write(json.dumps(event) + "\n")


def plain_parameters(module):
    return [name for name, p in module.named_parameters() if not isinstance(p, DTensor)]


real_to, real_cuda, real_shard = torch.nn.Module.to, torch.nn.Module.cuda, torch.distributed.fsdp.fully_shard


def to(self, *args, **kwargs):
    device = torch._C._nn._parse_to(*args, **kwargs)[0]
    if device is not None:
        record({"move": type(self).__name__, "device": str(device), "plain": plain_parameters(self)[:5]})
    return real_to(self, *args, **kwargs)


def cuda(self, *args, **kwargs):
    record({"move": type(self).__name__, "device": "cuda", "plain": plain_parameters(self)[:5]})
    return real_cuda(self, *args, **kwargs)


def fully_shard(module, *args, **kwargs):
    record({"shard": type(module).__name__})
    return real_shard(module, *args, **kwargs)


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


class AdamW(torch.optim.AdamW):
    steps = 0

    def step(self, *args, **kwargs):
        out = super().step(*args, **kwargs)
        AdamW.steps += 1
        if AdamW.steps <= 2:
            params = [p for group in self.param_groups for p in group["params"]]
            record({"step": AdamW.steps, "params": sorted({str(local(p).dtype) for p in params}),
                    "unsharded": sum(not isinstance(p, DTensor) for p in params),
                    "state": sorted({str(local(v).dtype) for p in params for k, v in self.state[p].items()
                                     if torch.is_tensor(v) and k != "step"})})
        return out


class autocast(torch.autocast):
    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        if enabled:
            record({"autocast": device_type, "dtype": str(dtype)})


torch.nn.Module.to, torch.nn.Module.cuda = to, cuda
torch.autocast = autocast
torch.distributed.fsdp.fully_shard = fully_shard  # the scripts import it from here
torch.optim.AdamW = AdamW
sys.argv = [script, *script_args]
runpy.run_path(script, run_name="__main__")
