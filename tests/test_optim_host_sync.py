"""No optimizer step reads a device value back to the host (steady state, PSS untriggered).

Counted on CPU with a TorchDispatchMode: every ``aten._local_scalar_dense`` (what ``.item()``, ``float(t)``,
``int(t)`` and ``bool(t)`` run) during ``step()`` is a read that on a GPU would stall the host until the device
catches up. torch.optim's own CPU-resident ``state["step"]`` counters are host tensors by design (torch reads
them too) and are excepted by identity. On a GPU, ``make gpu-check`` runs the same steps under
``torch.cuda.set_sync_debug_mode("error")`` (tests/test_gpu.py)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from stabkernels.optim import (PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam, SkipStep,
                               StableAdamW)

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
         torch.ops.aten.item.default}


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value to the host, except on the tensors in ``allowed``."""

    def __init__(self, allowed=()):
        super().__init__()
        self.allowed = {t.data_ptr() for t in allowed}
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS and not (args and args[0].data_ptr() in self.allowed):
            self.reads.append((func, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 5))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 10, generator=g), torch.randint(0, 5, (16,), generator=g)


OPTIMIZERS = {
    "RadiusController(Adam)": lambda m: RadiusController(torch.optim.Adam(m.parameters(), lr=1e-2), m),
    "RadiusController(SGD)": lambda m: RadiusController(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m),
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m),
    "RadiusAdamW-jvp": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m, method="jvp", every=1),
    "RadiusAdamW-head-only": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m, method="head", head=m[-1]),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=0.1, momentum=0.9, model=m),
    "SAdam": lambda m: SAdam(m, lr=1e-2),
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-2),
    "PSS(AdamW(fused))": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), m),
    "PSS(AdamW)-no-skip": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-2), m, skip_nonfinite=False),
    "OrthoGrad(AdamW)": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-2)),
    # skip-step with its rule active from the third step on (the warm-up steps above reach it)
    "SkipStep(AdamW(fused))": lambda m: SkipStep(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), window=4,
                                                 warmup=3),
    "SkipStep(RadiusAdamW)": lambda m: SkipStep(RadiusAdamW(m.parameters(), lr=1e-2, model=m), window=4, warmup=3),
    "StableAdamW": lambda m: StableAdamW(m.parameters(), lr=1e-2),
    # the skip flag folded into our kernels (SPEC 7.1) and update clipping (SPEC 7.2)
    "SkipStep(StableAdamW)": lambda m: SkipStep(StableAdamW(m.parameters(), lr=1e-2), window=4, warmup=3),
    "SkipStep(RadiusSGD)": lambda m: SkipStep(RadiusSGD(m.parameters(), lr=0.1, momentum=0.9, model=m), window=4,
                                              warmup=3),
    "SkipStep(RadiusController(Adam))": lambda m: SkipStep(
        RadiusController(torch.optim.Adam(m.parameters(), lr=1e-2), m), window=4, warmup=3),
    "SkipStep(SAdam)": lambda m: SkipStep(SAdam(m, lr=1e-2, loss_fn=lambda out, *a: out.square().mean()),
                                          window=4, warmup=3),
    "SkipStep(PSSAdamW)": lambda m: SkipStep(PSSAdamW(m, lr=1e-2), window=4, warmup=3),
    "SkipStep(PSSAdamW(update_clip))": lambda m: SkipStep(PSSAdamW(m, lr=1e-2, update_clip=True), window=4,
                                                          warmup=3),
    "RadiusAdamW(update_clip)": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m, update_clip=True),
    "SAdam(update_clip)": lambda m: SAdam(m, lr=1e-2, update_clip=True),
    "PSSAdamW(update_clip)": lambda m: PSSAdamW(m, lr=1e-2, update_clip=True),
}


def one_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if isinstance(opt, SAdam):
        return lambda: opt.step(probe_closure=lambda: F.cross_entropy(model(x), y), loss=loss)
    if isinstance(opt, SkipStep):
        return lambda: opt.step(loss=loss)
    return opt.step


def step_counters(opt):
    return [s["step"] for s in opt.state.values() if isinstance(s.get("step"), torch.Tensor)
            and s["step"].device.type == "cpu"]


def count_reads(make):
    model, x, y = model_and_batch()
    opt = make(model)
    for _ in range(3):  # warm-up: state created, EMA formed
        one_step(model, opt, x, y)()
    step = one_step(model, opt, x, y)
    with HostReads(step_counters(opt)) as mode:
        step()
    return mode.reads


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_host_read_in_a_step(name):
    assert count_reads(OPTIMIZERS[name]) == []


def test_pss_around_an_optimizer_that_cannot_skip_on_the_device_reads_once():
    # documented: the non-finite skip of a non-fused wrapped optimizer needs the norm on the host
    reads = count_reads(lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-2), m))
    assert len(reads) == 1


def test_no_host_read_in_a_qkclip_forward_backward_and_step():
    """QK-clip (SPEC 8.2): its hooks measure in the forward, its clip runs after the step: neither reads back."""
    from stabkernels.demo.lm import ByteLM
    from stabkernels.optim import QKClip

    torch.manual_seed(0)
    model = ByteLM(d=16, layers=2, heads=2, context=8)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    opt = QKClip(model, threshold=0.5).wrap(inner)
    x = torch.randint(0, 256, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()
    opt.zero_grad()
    with HostReads() as mode:
        model(x).logsumexp(-1).mean().backward()
        opt.step()
    assert (opt.clip.last_max_logits > 0.5).any()  # the clip acted
    assert mode.reads == []


def test_the_counter_sees_a_read():
    t = torch.ones(3)
    with HostReads() as mode:
        float(t.sum())
        bool(t[0] > 0)
    assert len(mode.reads) == 2
