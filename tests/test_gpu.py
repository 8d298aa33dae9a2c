"""GPU-only checks run by ``make gpu-check``: no optimizer step synchronises with the host
(``torch.cuda.set_sync_debug_mode("error")``), and the fused optimizers replay from a CUDA graph with eager's
numbers. Skipped without a CUDA device."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stabkernels.optim import (PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam, SkipStep,
                               StableAdamW)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 10)).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(32, 64, device="cuda", generator=g)
    y = torch.randint(0, 10, (32,), device="cuda", generator=g)
    return model, x, y


OPTIMIZERS = {
    "RadiusController(Adam)": lambda m: RadiusController(torch.optim.Adam(m.parameters(), lr=1e-2), m),
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m),
    "RadiusAdamW-jvp": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m, method="jvp", every=1),
    "RadiusAdamW-head-only": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m, method="head", head=m[-1]),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=0.1, momentum=0.9, model=m),
    "SAdam": lambda m: SAdam(m, lr=1e-2, seed=3),
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-2),
    "PSS(AdamW(fused))": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), m),
    "OrthoGrad(AdamW(fused))": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)),
    # update clipping (SPEC 7.2) and the skip flag folded into the kernels (SPEC 7.1); the rule active from step 3
    "StableAdamW": lambda m: StableAdamW(m.parameters(), lr=1e-2),
    "RadiusAdamW(update_clip)": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m, update_clip=True),
    "SAdam(update_clip)": lambda m: SAdam(m, lr=1e-2, seed=3, update_clip=True),
    "SkipStep(StableAdamW)": lambda m: SkipStep(StableAdamW(m.parameters(), lr=1e-2), window=4, warmup=3),
    "SkipStep(RadiusAdamW)": lambda m: SkipStep(RadiusAdamW(m.parameters(), lr=1e-2, model=m), window=4, warmup=3),
    "SkipStep(PSSAdamW)": lambda m: SkipStep(PSSAdamW(m, lr=1e-2), window=4, warmup=3),
}


def backward_and_step(model, opt, x, y):
    opt.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if isinstance(opt, SAdam):
        return lambda: opt.step(probe_closure=lambda: F.cross_entropy(model(x), y), loss=loss)
    if isinstance(opt, SkipStep):
        return lambda: opt.step(loss=loss)
    return opt.step


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_never_synchronises(name):
    model, x, y = model_and_batch()
    opt = OPTIMIZERS[name](model)
    for _ in range(3):  # state created, kernels compiled, EMA formed
        backward_and_step(model, opt, x, y)()
    step = backward_and_step(model, opt, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


CAPTURED = {
    "RadiusAdamW": OPTIMIZERS["RadiusAdamW"],
    "RadiusSGD": OPTIMIZERS["RadiusSGD"],
    "SAdam-update": lambda m: SAdam(m, lr=1e-2, probes=0),
    "PSSAdamW-untriggered": lambda m: PSSAdamW(m, lr=1e-2, trigger=None),
    "StableAdamW": OPTIMIZERS["StableAdamW"],
}


@pytest.mark.parametrize("name", list(CAPTURED))
def test_fused_step_replays_from_a_cuda_graph(name):
    """Forward, backward and step captured once and replayed 3 times = 3 eager iterations (torch's recipe
    for whole-iteration capture: warm up on a side stream, static inputs, grads zeroed in place)."""
    model, x, y = model_and_batch()
    eager_model = copy.deepcopy(model)
    eager_opt = CAPTURED[name](eager_model)
    opt = CAPTURED[name](model)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for m, o in ((model, opt), (eager_model, eager_opt)):  # the same warm-up step on both
            backward_and_step(m, o, x, y)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backward_and_step(model, opt, x, y)()
    for _ in range(3):
        graph.replay()
        backward_and_step(eager_model, eager_opt, x, y)()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
