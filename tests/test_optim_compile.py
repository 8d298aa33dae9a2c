"""``torch.compile(opt.step)`` runs for every optimizer and gives eager's numbers (CPU, inductor).

Graph breaks are allowed (the probes call the model, PSS reads its lagged decision back); the bench reports
how many. What must hold: the compiled step traces our ops through their fake kernels and takes the same step."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stabkernels.optim import PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam

OPTIMIZERS = {
    "RadiusController(Adam)": lambda m: RadiusController(torch.optim.Adam(m.parameters(), lr=1e-2), m),
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=0.1, momentum=0.9, model=m),
    "SAdam": lambda m: SAdam(m, lr=1e-2, probes=2, seed=3),
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-2, every=2),
    "PSS(AdamW)": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-2), m),
    "OrthoGrad(AdamW)": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-2)),
}


def run(name, compiled, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 5))
    opt = OPTIMIZERS[name](model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 10, generator=g), torch.randint(0, 5, (16,), generator=g)
    step = torch.compile(opt.step) if compiled else opt.step
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if isinstance(opt, SAdam):
            step(lambda: F.cross_entropy(model(x), y), loss=loss)
        else:
            step()
    if hasattr(opt, "flush"):
        opt.flush()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_step_matches_eager(name):
    from torch._dynamo.utils import counters

    eager = run(name, compiled=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(name, compiled=True)
    assert counters["stats"]["unique_graphs"] > 0  # something was compiled, not all skipped
    assert eager[0].abs().sum() > 0
    for a, b in zip(eager, compiled):
        # inductor's AdamW kernel rounds differently from torch's eager one (a few fp32 ulps)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
