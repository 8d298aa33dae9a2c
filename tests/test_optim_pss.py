"""PSS wrapper: trigger rule, smoothing on trigger, non-finite handling, selection, state_dict resume,
schedulers and GradScaler."""
import copy
import io

import pytest
import torch
from torch import nn

import stabkernels as sk
from stabkernels.optim import PSS, PSSAdamW
from stabkernels.optim.pss import global_grad_norm

from .test_spectral import SMOOTH_SPECTRUM, matrix_with_spectrum


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def train(model, opt, steps, seed=1, after_step=None):
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x = torch.randn(16, 12, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if after_step:
            after_step(t)


@pytest.mark.parametrize("lagged", [True, False])
def test_ratio_trigger_ema_and_warmup(lagged):
    model = small_model()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pss = PSS(torch.optim.SGD(model.parameters(), lr=0.0), warmup=3, lagged=lagged)
    norms = [1.0, 10.0, 1.0, 1.0, 1.0, 2.0, 6.0, 1.0]  # EMA before step 7: 1.69; 6 > 2.5 * 1.69
    fired = []
    for g in norms:
        ema_before = pss.ema
        pss.step(grad_norm=g)
        # lagged: the decision is applied by the next step or by flush(); not lagged: already applied
        flushed = pss.flush()
        if not lagged:
            assert flushed is False
        fired.append(pss.last.triggered)
        if pss.last.triggered:
            assert pss.ema == ema_before  # the spike stays out of the EMA
    # step 2 (10.0) is in the warm-up: no trigger, but it enters the EMA
    assert fired == [False, False, False, False, False, False, True, False]
    ema = 1.0
    for g in norms[1:6] + norms[7:]:
        ema = 0.9 * ema + 0.1 * g
    assert pss.ema == pytest.approx(ema)
    assert pss.last.reason is None and pss.trigger_count == 1


def test_every_and_manual_smoothing():
    model = small_model()
    pss = PSS(torch.optim.SGD(model.parameters(), lr=0.01), every=2, trigger=None)
    reasons = []
    train(model, pss, 5, after_step=lambda t: (pss.flush(), reasons.append(pss.last.reason)))
    assert reasons == [None, "every", None, "every", None]
    rep = pss.smooth_now()
    assert rep.reason == "manual" and rep.sigma.shape == (3,) and rep.k.dtype == torch.int64


def test_trigger_smooths_the_selected_matrices():
    model = nn.Linear(36, 48, bias=False)
    with torch.no_grad():
        model.weight.copy_(matrix_with_spectrum(SMOOTH_SPECTRUM, 48, 36).float())
    model.weight.grad = torch.zeros_like(model.weight)
    pss = PSS(torch.optim.SGD(model.parameters(), lr=0.0), warmup=0)
    pss.step(grad_norm=1.0)
    before = model.weight.detach().clone()
    pss.step(grad_norm=100.0)  # ratio 100 > 2.5, decided on the device
    rep = pss.last
    assert not rep.triggered and torch.equal(model.weight, before)  # lagged: applied when the next step begins
    pss.step(grad_norm=1.0)
    assert rep.triggered and rep.reason == "ratio" and rep.k.tolist() == [3] and pss.trigger_count == 1
    assert rep.sigma[0].item() == pytest.approx(10.0, rel=1e-3)
    assert rep.stable_rank[0].item() == pytest.approx(sum(s * s for s in SMOOTH_SPECTRUM) / 100, rel=1e-3)
    top = torch.linalg.svdvals(model.weight.double())[0].item()
    assert top == pytest.approx(8.0, rel=1e-3) and rep.sigma_after[0].item() == pytest.approx(8.0, rel=1e-3)


def test_nonfinite_grad_norm_leaves_everything_untouched():
    model = small_model()
    pss = PSSAdamW(model.parameters(), lr=1e-2, every=1)
    train(model, pss, 2)
    assert pss.flush()  # step 2's smoothing (every=1)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(pss.optimizer.state_dict())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    pss.step()  # the fused AdamW skips on the device-side flag
    assert not pss.flush()
    assert pss.last.skipped_nonfinite and not pss.last.triggered
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = pss.optimizer.state_dict()
    for i in state["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after["state"][i][key], state["state"][i][key]), key
    pss2 = PSS(torch.optim.SGD(model.parameters(), lr=1.0), skip_nonfinite=False, every=1)
    pss2.step()
    assert pss2.last.skipped_nonfinite and not pss2.last.triggered
    assert torch.isnan(next(model.parameters())).all()  # the user asked for the step


def test_never_triggered_pss_is_the_wrapped_optimizer():
    a, b = small_model(), small_model()
    train(a, torch.optim.AdamW(a.parameters(), lr=1e-2), 12)
    train(b, PSSAdamW(b.parameters(), lr=1e-2, trigger=None), 12)  # fused AdamW by default
    assert all(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    a = small_model()
    train(a, torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True), 12)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_state_dict_round_trip_resumes_bit_identically():
    model = small_model()
    opt = PSSAdamW(model, lr=5e-2, every=2, warmup=1, trigger=1.05)
    train(model, opt, 5, seed=3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 6, seed=4)
    assert opt.trigger_count >= 3
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = small_model(seed=123)
    model2.load_state_dict(saved["model"])
    opt2 = PSSAdamW(model2, lr=5e-2, every=2, warmup=1, trigger=1.05)
    opt2.load_state_dict(saved["opt"])
    train(model2, opt2, 6, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), model2.parameters()))
    assert opt2.ema == opt.ema and opt2.trigger_count == opt.trigger_count
    with pytest.raises(ValueError, match="expects the dict its state_dict"):
        opt2.load_state_dict(saved["opt"]["optimizer"])
    plain = PSS(torch.optim.AdamW(model2.parameters(), lr=5e-2), model2)
    plain.load_state_dict(saved["opt"])  # PSS and PSSAdamW share their state layout


def test_selection():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 8), nn.Conv1d(1, 2, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shapes = lambda pss: [tuple(p.shape) for p in pss.matrices]  # noqa: E731
    assert shapes(PSS(opt)) == [(10, 6), (8, 18), (2, 1, 3)]
    assert shapes(PSS(opt, model)) == [(8, 18), (2, 1, 3)]
    assert shapes(PSS(opt, lambda p: p.shape[0] == 8)) == [(8, 18)]
    assert shapes(PSS(opt, [model[2].weight])) == [(8, 18)]
    with pytest.raises(ValueError, match="ndim >= 2"):
        PSS(opt, [model[2].bias])
    with pytest.raises(ValueError, match="not a parameter"):
        PSS(opt, [nn.Linear(3, 3).weight])
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        PSS(model)
    with pytest.raises(ValueError, match="cap"):
        PSS(opt, rule="cap")


def test_global_grad_norm_matches_clip_grad_norm():
    model = small_model()
    train(model, torch.optim.SGD(model.parameters(), lr=0.0), 1)
    want = nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    torch.testing.assert_close(global_grad_norm(model.parameters()), want)


def test_lr_scheduler_and_grad_scaler():
    model = small_model()
    pss = PSSAdamW(model.parameters(), lr=1e-2, every=1)
    sched = torch.optim.lr_scheduler.StepLR(pss, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    for _ in range(2):
        pss.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(pss)
        scaler.update()
        sched.step()
    assert pss.param_groups[0]["lr"] == pytest.approx(2.5e-3) and pss.steps == 2
    params = [p.detach().clone() for p in model.parameters()]
    pss.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(pss)  # inf gradients: the scaler skips our step
    assert pss.steps == 2 and all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_spectral_report():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Conv2d(3, 4, 3), nn.Linear(8, 6))
    with torch.no_grad():
        model[2].weight.copy_(matrix_with_spectrum([5.0, 2.0, 1.0], 6, 8).float())
    table = sk.spectral_report(model)
    assert table.names == ["1.weight", "2.weight"] and table.shapes == [(4, 3, 3, 3), (6, 8)]
    assert table.sigma[1].item() == pytest.approx(5.0, rel=1e-4)
    assert table.stable_rank[1].item() == pytest.approx(30 / 25, rel=1e-3)
    assert table.frobenius[1].item() == pytest.approx(30 ** 0.5, rel=1e-5)
    assert "2.weight" in str(table)
    assert len(sk.spectral_report(model, include_embeddings=True).names) == 3
