"""torchrun (torch.distributed): the helpers that let train_rl.py, train_sft.py and eval.py run on N processes.

Without torchrun a process is rank 0 of 1 and every helper is a no-op. Under torchrun, rank 0 alone writes
files (the run folder: rundir.py); `on_main` runs such a rank-0 step and tells every rank how it went, so
an error there stops all ranks with its one line instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

import atexit
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def init_dist(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group once: gloo on the CPU, nccl on CUDA (one GPU
    per rank, cuda:LOCAL_RANK). Returns the device this rank computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        _die_with_parent()
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        atexit.register(_shutdown)
    if dist.is_initialized() and torch.device(device).type == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return device


def _shutdown():
    """At exit, while the interpreter is whole: destroy the process group and free what still holds it (FSDP's
    modules sit in reference cycles), so that its gloo threads are not torn down in the interpreter's teardown
    (seen: 'terminate called without an active exception', SIGABRT, in 6 of 60 --fsdp runs on gloo; 0 of 60 since)."""
    dist.destroy_process_group()
    gc.collect()


def _die_with_parent():
    """torchrun starts every worker in a session of its own, so `kill -9` of torchrun's process group leaves
    the workers training (and writing checkpoints) as orphans: on Linux, ask for SIGKILL when it dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher is already gone
            os._exit(1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def share(n: int, what: str) -> range:
    """This rank's contiguous share of n items (n must divide evenly: every rank runs the same steps)."""
    if n % world():
        raise ValueError(f"{what} ({n}) must be divisible by the number of processes ({world()})")
    k = n // world()
    return range(rank() * k, (rank() + 1) * k)


def part(n: int) -> range:
    """This rank's contiguous part of n items when they need not divide evenly (sizes differ by at most 1)."""
    return range(n * rank() // world(), n * (rank() + 1) // world())


def _comm(t: torch.Tensor) -> torch.Tensor:
    return t.to("cuda" if dist.get_backend() == "nccl" else "cpu")


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a new tensor on t's device)."""
    if world() == 1:
        return t
    x = _comm(t.detach().clone())
    dist.all_reduce(x)
    return x.to(t.device)


def all_true(flag: bool) -> bool:
    """True when the flag holds on every rank."""
    return bool(all_sum(torch.tensor([0 if flag else 1])).item() == 0)


def gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's t (same shape on all) concatenated in rank order along dim."""
    if world() == 1:
        return t
    parts = [torch.empty_like(_comm(t)) for _ in range(world())]
    dist.all_gather(parts, _comm(t.contiguous()))
    return torch.cat(parts, dim).to(t.device)


def gather_objects(obj) -> list:
    """Every rank's picklable obj, in rank order."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def average_grads(params):
    """Average the accumulated gradients over ranks once per optimizer step (after the last micro-batch, as
    DDP with no_sync on the others would); a parameter without a gradient counts as zero. FSDP-sharded
    parameters are skipped: fully_shard reduce-scatters their gradients itself."""
    if world() == 1:
        return
    work = []
    for p in params:
        if isinstance(p.data, DTensor):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.div_(world())
        work.append(dist.all_reduce(p.grad, async_op=True))
    for w in work:
        w.wait()


def shard_model(model):
    """FSDP2: fully_shard every decoder layer and vision block, then the vision tower's own weights, the
    input embedding and lm_head as ONE group (the 3B ties them: a shared weight must live in one group),
    the language model's final norm, and the root. Our decode and scoring code calls these modules
    directly; each unit gathers its weights in its own forward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    lm, vis = model.model.language_model, model.model.visual
    for layer in lm.layers:
        fully_shard(layer)
    for block in vis.blocks:
        fully_shard(block)
    fully_shard(vis)
    fully_shard([lm.embed_tokens, model.lm_head])
    fully_shard(lm)
    fully_shard(model)
    model.lvr_run = lambda fn, *args, **kw: fn(*args, **kw)  # our passes start here (see run)
    register_fsdp_forward_method(model, "lvr_run")
    return model


def run(model, fn, *args, **kw):
    """fn(*args, **kw); on an FSDP model inside its root's forward: FSDP2 wants every pass (a decode, a
    scoring forward and its backward) to start at the root, while our code calls the units directly."""
    return model.lvr_run(fn, *args, **kw) if hasattr(model, "lvr_run") else fn(*args, **kw)


def is_sharded(model) -> bool:
    return any(isinstance(p.data, DTensor) for p in model.parameters())


def make_optimizer(params, lr: float, zero: bool = False):
    """AdamW; with `zero` a ZeroRedundancyOptimizer around it: each rank keeps 1/N of its state. On CUDA the
    fused kernel (the default foreach one makes a temporary as large as the trained weights; FSDP's sharded
    parameters keep the default)."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda and not hasattr(p, "full_tensor") for p in params)
    kw = dict(lr=lr, weight_decay=0.0, **({"fused": True} if fused else {}))
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kw)
    return torch.optim.AdamW(params, **kw)


def _param_names(model, opt) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def optimizer_state(model, opt) -> dict | None:
    """The whole optimizer state in plain AdamW's layout (parameters numbered in optimizer order), so any
    number of processes can resume it; None off rank 0. A collective under --zero (consolidated onto rank
    0) and --fsdp (gathered): every rank must call it."""
    if type(opt).__name__ == "ZeroRedundancyOptimizer":
        opt.consolidate_state_dict(to=0)
        return opt.state_dict() if is_main() else None
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    return {"state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]} if is_main() else None


def load_optimizer_state(model, opt, sd: dict):
    """Load optimizer_state's output (ZeRO keeps this rank's share, FSDP this rank's shards)."""
    if not is_sharded(model):
        return opt.load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _param_names(model, opt)
    named = {"state": {names[i]: v for i, v in sd["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, opt, named, options=StateDictOptions(full_state_dict=True))


def model_state(model) -> dict | None:
    """The full weights of an FSDP-sharded model (a collective: every rank calls it; None off rank 0), else None."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if is_main() else None


def broadcast(obj):
    """Rank 0's picklable obj, on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankZeroError(RuntimeError):
    """Raised on the other ranks when a step `on_main` ran on rank 0 failed; the message is rank 0's line."""


def on_main(fn, *args, **kw):
    """fn(*args, **kw) on rank 0 alone (file writes, the run lock); every rank gets its result, or stops:
    rank 0 re-raises its error and the others raise RankZeroError with its first line. Not for fn that
    holds a collective. One process: fn(*args, **kw)."""
    if world() == 1:
        return fn(*args, **kw)
    result, err = None, None
    if is_main():
        try:
            result = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            err = e
    said = broadcast((result, None if err is None else (str(err).splitlines() or [type(err).__name__])[0]))
    if err is not None:
        raise err
    if said[1] is not None:
        raise RankZeroError(said[1])
    return said[0]


def add_parallel_args(p):
    """--zero / --fsdp (torchrun with 2+ processes), the same in train_rl.py."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--zero", action="store_true", help="under torchrun: shard AdamW's state over the processes "
                                                       "(ZeroRedundancyOptimizer); weights and gradients stay whole")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2, weights, gradients and optimizer state "
                                                       "sharded (decoder layers, vision blocks, embeddings + lm_head)")


def check_parallel(args):
    if (args.zero or args.fsdp) and world() < 2:
        raise ValueError("--zero and --fsdp shard over processes: run under torchrun --nproc-per-node N (N >= 2)")
