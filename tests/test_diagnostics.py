"""kappa(V) diagnostics against explicit operators (numpy eig), Lanczos against eigvalsh, and the monitor."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stabkernels.diagnostics import (InstabilityMonitor, hessian, kappa_adam_bound, kappa_dense, kappa_momentum,
                                     kappa_of, top_hessian_eigenvalues)


def random_spd(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.rand(n, generator=g, dtype=torch.float64) * scale + 0.05
    return (Q * lam) @ Q.T, lam


def numpy_kappa(J):
    lam, V = np.linalg.eig(J)  # unit-norm eigenvector columns
    s = np.linalg.svd(V, compute_uv=False)
    return float(np.abs(lam).max()), float(s[0] / s[-1])


@pytest.mark.parametrize("lr,mu,scale", [(0.1, 0.9, 30.0), (0.05, 0.5, 10.0), (0.3, 0.99, 5.0)])
def test_momentum_closed_form_matches_explicit_operator(lr, mu, scale):
    H, lam = random_spd(6, seed=int(lr * 100), scale=scale)
    n = H.shape[0]
    I = np.eye(n)
    J = np.block([[I - lr * H.numpy(), -lr * mu * I], [H.numpy(), mu * I]])
    rho, kappa = numpy_kappa(J)
    res = kappa_momentum(lam, lr, mu)
    assert res.rho == pytest.approx(rho, rel=1e-8)
    assert res.kappa == pytest.approx(kappa, rel=1e-8)


def test_exceptional_points_give_large_kappa():
    lr, mu = 0.1, 0.9
    for point in ((1 - math.sqrt(mu)) ** 2 / lr, (1 + math.sqrt(mu)) ** 2 / lr):
        near = kappa_momentum([point * (1 + 1e-3)], lr, mu).kappa
        nearer = kappa_momentum([point * (1 + 1e-4)], lr, mu).kappa
        assert 50 < near < nearer  # SPEC 5: hundreds within 0.01-0.1% of an exceptional point
        assert kappa_momentum([point], lr, mu).kappa > 1e6
    away = kappa_momentum([1.0, 5.0, 20.0], lr, mu).per_eigenvalue
    assert torch.all((away > 1.5) & (away < 25))  # "1.7-21 away from the exceptional points"


def test_adam_bound_holds_on_random_spd_and_diagonal_preconditioners():
    for seed in range(20):
        H, _ = random_spd(8, seed, scale=10.0)
        g = torch.Generator().manual_seed(100 + seed)
        M = torch.exp(torch.randn(8, generator=g, dtype=torch.float64) * 2)
        J = torch.eye(8, dtype=torch.float64) - 0.05 * M[:, None] * H
        assert kappa_of(J).kappa <= math.sqrt(M.max() / M.min()) * (1 + 1e-9)


def tiny_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def tiny_batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, generator=g, dtype=dtype), torch.randint(0, 2, (16,), generator=g)


def loss_fn(forward, batch):
    return F.cross_entropy(forward(batch[0]), batch[1])


def test_lanczos_matches_eigvalsh_of_the_explicit_hessian():
    model, batch = tiny_net(), tiny_batch()
    H = hessian(model, loss_fn, batch)
    want = torch.linalg.eigvalsh(H).flip(0)[:3]
    got = top_hessian_eigenvalues(model, loss_fn, batch, k=3)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(H, H.T)


def test_dense_operator_for_sgd_momentum_and_adam():
    model, batch = tiny_net(), tiny_batch()
    H = hessian(model, loss_fn, batch)
    lam = torch.linalg.eigvalsh(H)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    assert kappa_dense(model, loss_fn, batch, sgd).kappa == pytest.approx(1.0, abs=1e-8)  # symmetric J
    mom = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    dense = kappa_dense(model, loss_fn, batch, mom)
    closed = kappa_momentum(lam, 0.5, 0.9)
    assert dense.rho == pytest.approx(closed.rho, rel=1e-6)
    assert dense.kappa == pytest.approx(closed.kappa, rel=1e-5)
    adam = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.0, 0.99))
    loss_fn(model, batch).backward()
    adam.step()
    bound = kappa_adam_bound(adam)
    M = torch.cat([1 / ((adam.state[p]["exp_avg_sq"] / (1 - 0.99)).sqrt() + 1e-8).reshape(-1)
                   for p in model.parameters()])
    assert bound == pytest.approx(math.sqrt(float(M.max() / M.min())), rel=1e-12)
    assert kappa_dense(model, loss_fn, batch, adam).kappa <= bound * (1 + 1e-9)


@pytest.mark.filterwarnings("ignore:InstabilityMonitor")  # rho(J) >= 1 here: the monitor rightly warns
def test_monitor_measures_on_schedule_with_the_dense_operator():
    model, batch = tiny_net(), tiny_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    mon = InstabilityMonitor(opt, model, every=3, loss_fn=loss_fn)
    assert mon.method == "dense"
    records = [mon.step(batch, loss=1.0) for _ in range(7)]
    assert [r is not None for r in records] == [True, False, False, True, False, False, True]
    want = kappa_dense(model, loss_fn, batch, opt)
    assert records[0].rho == pytest.approx(want.rho) and records[0].kappa == pytest.approx(want.kappa)
    assert records[0].eps == 0.0 and records[3].eps == 0.0  # same point: J did not change


def test_monitor_warns_once_per_episode(monkeypatch):
    model = tiny_net()
    mon = InstabilityMonitor(torch.optim.SGD(model.parameters(), lr=0.1), model, every=1, eps=0.1)
    values = iter([(0.5, 2.0, 0), (0.85, 1.0, 0), (0.95, 2.0, 0), (0.99, 3.0, 0), (0.5, 1.0, 0), (0.97, 4.0, 0)])
    monkeypatch.setattr(mon, "_measure", lambda batch: next(values))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            mon.step(None)
    assert [r.warn for r in mon.history] == [False, False, True, True, False, True]
    assert len([w for w in caught if "InstabilityMonitor" in str(w.message)]) == 2  # two episodes


def test_instability_example_runs_and_summarises(tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "instability_monitor.py")
    spec = importlib.util.spec_from_file_location("instability_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.run("sgd", steps=200, growth=1.06)
    assert r["spike_step"] < len(r["loss"]) <= 200  # the growing lr breaks training
    assert len(r["kappa"]) == len(r["rho"]) == len(r["loss"]) and all(k >= 1 for k in r["kappa"])
    assert r["rho_lead"] is not None and r["rho_lead"] > 0  # rho(J) left 1 before the spike
