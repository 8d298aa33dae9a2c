"""DDP: with 2 gloo ranks on CPU, each on its half of every batch, every optimizer keeps the ranks
bit-identical and equals one process stepping on the global batch (same init) to fp32 rounding. The
optimizers are constructed with the DDP-wrapped module, as a user would."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from stabkernels import distributed
from stabkernels.optim import PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam

STEPS, BATCH = 5, 32
OPTIMIZERS = {
    "RadiusController(Adam)": lambda m: RadiusController(torch.optim.Adam(m.parameters(), lr=0.5), m),
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=0.5, model=m),
    "RadiusAdamW-q0.9": lambda m: RadiusAdamW(m.parameters(), lr=0.5, model=m, reduce=0.9),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=20.0, momentum=0.9, model=m),
    "SAdam": lambda m: SAdam(m, lr=1e-2, sigma=0.05),
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-2, every=2),
    "PSS(AdamW)": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-2), m, every=2),
    "OrthoGrad(AdamW)": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-2)),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))


def batches():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 10, generator=g), torch.randint(0, 5, (STEPS, BATCH), generator=g)


def train(name, model, wrapped, rows, torch_seed):
    """STEPS steps of optimizer ``name`` built on ``wrapped`` (the DDP module or the model), on ``rows``.
    ``torch_seed`` differs by rank, so S-Adam's default seeds differ until the ranks agree on rank 0's."""
    torch.manual_seed(torch_seed)
    opt = OPTIMIZERS[name](wrapped)
    xs, ys = batches()
    for t in range(STEPS):
        x, y = xs[t][rows], ys[t][rows]
        opt.zero_grad()
        loss = F.cross_entropy(wrapped(x), y)
        loss.backward()
        if isinstance(opt, SAdam):
            opt.step(probe_closure=lambda: F.cross_entropy(model(x), y), loss=loss)  # this rank's share
        else:
            opt.step()
    if hasattr(opt, "flush"):
        opt.flush()
    return [p.detach().clone() for p in model.parameters()], getattr(opt, "last", None)


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        per = BATCH // world
        for name in OPTIMIZERS:
            model = make_model()
            ddp = nn.parallel.DistributedDataParallel(model)
            params, _ = train(name, model, ddp, slice(rank * per, (rank + 1) * per), torch_seed=100 + rank)
            torch.save(params, os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, *args, timeout=150):
    ctx = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-rank run did not finish in {timeout} s")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(worker, 2, str(out))
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_ranks_identical_and_equal_to_one_process_on_the_global_batch(name, ddp_results):
    r0 = torch.load(ddp_results / f"{name}-0.pt")
    r1 = torch.load(ddp_results / f"{name}-1.pt")
    assert all(torch.equal(a, b) for a, b in zip(r0, r1)), "the replicas drifted apart"
    model = make_model()
    single, last = train(name, model, model, slice(0, BATCH), torch_seed=100)  # rank 0's seed
    if name.startswith("Radius"):
        assert float(last.scale) < 1  # the control binds, so a wrong radius would show
    if name == "SAdam":
        assert float(last.rho[0]) > 0
    start = make_model().parameters()
    assert any(not torch.equal(a, b) for a, b in zip(single, start))
    for a, b in zip(r0, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def uneven_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        spreads = torch.arange(3.0 + rank)  # 3 samples on rank 0, 4 on rank 1
        try:
            distributed.gather_rows(spreads)
        except ValueError as e:
            message = str(e)
        else:
            message = "no error"
        with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_quantile_radius_with_uneven_per_rank_samples_is_refused_not_hung(tmp_path):
    spawn(uneven_worker, 2, str(tmp_path), timeout=60)
    for rank in (0, 1):
        text = (tmp_path / f"{rank}.txt").read_text()
        assert "same number of samples on every rank" in text and "[3, 4]" in text, text


def test_one_process_runs_no_collective():
    assert distributed.group() is None
    t = torch.tensor([1.0, 2.0])
    assert distributed.max_(t) is t and distributed.mean(t) is t and distributed.gather_rows(t) is t
    assert distributed.broadcast_int(5) == 5
