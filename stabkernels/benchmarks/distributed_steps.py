"""``python -m stabkernels.benchmarks.distributed_steps``: the time of one training step (forward, backward,
``step()``) of each optimizer under DDP and under FSDP2, against ``torch.optim.AdamW(fused=True)`` under the
same wrapper,
with 2 ranks (gloo on CPU, NCCL on GPUs); writes ``<out>/<name>-distributed.{csv,md}``.

Every optimizer has its own copy of the model; the steps are interleaved round by round (all ranks take the
same steps in the same order, a barrier before each), and the median over rounds is reported, as rank 0
measured it."""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from .compiled_steps import bench_model, optimizers
from .run import cpu_isa, machine_name
from .._csv import write_rows

WRAPPERS = ("DDP", "FSDP2")


def _wrap(kind: str, model: nn.Module, mesh) -> nn.Module:
    if kind == "DDP":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _worker(rank, world, port, device, width, batch, rounds, out):
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    warnings.simplefilter("ignore")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (world,))
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(batch, width, generator=g).to(device)
        y = torch.randint(0, 64, (batch,), generator=g).to(device)
        runs = {}
        for kind in WRAPPERS:
            for name, make in optimizers().items():
                model = _wrap(kind, bench_model(device, width), mesh)
                runs[(kind, name)] = (model, make(model))
        times = {key: [] for key in runs}
        for r in range(rounds + 1):  # round 0 warms up
            for key, (model, opt) in runs.items():
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if key[1] == "SAdam":
                    opt.step(loss=loss.detach(), probe_closure=lambda model=model: F.cross_entropy(model(x), y))
                else:
                    opt.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times[key].append(time.perf_counter() - t0)
        if rank == 0:
            params = sum(p.numel() for p in bench_model("cpu", width).parameters())
            rows = []
            for kind in WRAPPERS:
                base = statistics.median(times[(kind, "AdamW(fused=True)")])
                for (k, name), ts in times.items():
                    if k == kind:
                        med = statistics.median(ts)
                        rows.append({"wrapper": kind, "optimizer": name, "step_ms": round(med * 1e3, 3),
                                     "vs_adamw": round(med / base, 2), "ranks": world, "device": device,
                                     "params": params, "batch_per_rank": batch})
            _write(out, rows)
    finally:
        gc.collect()  # DDP/FSDP2 cycles hold the gloo group: freed at exit, torch 2.11 can abort (tests/test_distributed.py)
        dist.destroy_process_group()


def _write(stem: str, rows: list[dict]) -> None:
    write_rows(stem + ".csv", rows)
    r0 = rows[0]
    with open(stem + ".md", "w") as f:
        isa = f" (CPU kernels: {cpu_isa()})" if r0["device"] == "cpu" else ""
        f.write(f"{machine_name()}{isa}, torch {torch.__version__}, {r0['ranks']} ranks on {r0['device']} "
                f"({'NCCL' if r0['device'] == 'cuda' else 'gloo'}), MLP with {r0['params']} parameters, batch "
                f"{r0['batch_per_rank']} per rank; one training step (forward, backward, step), median\n\n")
        f.write("| optimizer | DDP (ms) | DDP vs AdamW | FSDP2 (ms) | FSDP2 vs AdamW |\n|---|---|---|---|---|\n")
        by = {(r["wrapper"], r["optimizer"]): r for r in rows}
        for name in dict.fromkeys(r["optimizer"] for r in rows):
            d, s = by[("DDP", name)], by[("FSDP2", name)]
            f.write(f"| {name} | {d['step_ms']} | {d['vs_adamw']}x | {s['step_ms']} | {s['vs_adamw']}x |\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.device_count() >= 2 else "cpu")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=os.path.join("bench", "results"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    isa = cpu_isa().lower() if args.device == "cpu" else ""
    stem = os.path.join(args.out, f"{args.name or machine_name() + ('-' + isa if isa else '')}-distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, args.device, args.width, args.batch, args.rounds, stem), nprocs=2,
                       start_method="spawn")
    print(open(stem + ".md").read())
    print(f"wrote {stem}.csv and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
