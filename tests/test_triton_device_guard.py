"""Every Triton launch runs inside a device guard for its tensors' device (issue 25 item 3): Triton launches on
the current device, so tensors on cuda:1 while cuda:0 is current would otherwise be read by the wrong GPU. Checked
without a GPU: the guard is replaced by a recorder and every launch notes the guards it runs under."""
import contextlib

import pytest
import torch
import triton.runtime.jit as triton_jit

import stabkernels as sk
from stabkernels import _launch_plan, directional, spectral, update
from stabkernels.backend import why_unavailable

pytestmark = pytest.mark.skipif(why_unavailable("triton", "cpu") is not None, reason="no Triton interpreter")


@pytest.fixture
def launches(monkeypatch):
    guards, seen = [], []

    @contextlib.contextmanager
    def guard(device):
        guards.append(torch.device(device))
        try:
            yield
        finally:
            guards.pop()

    real = triton_jit.KernelInterface.__getitem__

    def getitem(self, grid):
        launch = real(self, grid)

        def run(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            seen.append((getattr(self, "__name__", repr(self)), list(guards), devices))
            return launch(*args, **kwargs)
        return run

    monkeypatch.setattr(_launch_plan, "device_guard", guard)
    monkeypatch.setattr(triton_jit.KernelInterface, "__getitem__", getitem)
    return seen


def every_triton_entry_point():
    torch.manual_seed(0)
    ps = [torch.randn(5, 3), torch.randn(7)]
    gs = [torch.randn_like(p) for p in ps]
    m, v = [torch.zeros_like(p) for p in ps], [torch.rand_like(p) for p in ps]
    t = dict(backend="triton")
    update.adam_step_(ps, gs, m, v, step=1, lr=1e-2, updates=[torch.empty_like(p) for p in ps], **t)
    update.sgd_step_(ps, gs, m, lr=1e-2, momentum=0.9, first=True, **t)
    update.apply_update_(ps, gs, torch.tensor(0.1), **t)
    spectral.sq_norms(ps, **t)
    spectral.power_iteration_([ps[0]], [torch.randn(5)], [torch.randn(3)], **t)
    directional.random_directions(ps, 1, 0, **t)
    directional.perturb(ps, 1, 0, 0.01, **t)
    directional.directional_dots(gs, 1, 2, **t)
    for p, g in zip(ps, gs):
        p.grad = g
    directional.orthograd_(ps, **t)
    torch.ops.stabkernels.shard_normals([torch.empty(6), torch.empty(3)],
                                        directional.device_key_table(1, 0, 1, 2, "cpu")[0], [2, 0], "triton")
    z, y = torch.randn(4, 9, requires_grad=True), torch.tensor([0, 3, 8, 1])
    sk.cross_entropy_z_loss(z, y, **t)[0].backward(torch.tensor(2.0))
    sk.stablemax_cross_entropy(z, y, **t).backward()
    cw = torch.rand(9) + 0.5  # the options' variants (class weights, their sum, smoothing, softcap)
    sk.cross_entropy_z_loss(z, y, label_smoothing=0.1, softcap=5.0, class_weight=cw, **t)[0].backward()
    sk.linear_cross_entropy(torch.randn(4, 6, requires_grad=True), torch.randn(9, 6), y, loss="stablemax",
                            label_smoothing=0.1, class_weight=cw, chunk_size=2, **t)[0].backward()
    sk.row_spread(torch.randn(4, 9), "none", **t)
    sk.tangent_spread_linear(torch.randn(4, 6), torch.randn(4, 6), torch.randn(9, 6), None, None, "none", **t)
    sk.qk_max_logits(torch.randn(1, 4, 5, 6), torch.randn(1, 2, 5, 6), **t)


def test_every_triton_launch_runs_under_a_guard_for_its_tensors_device(launches):
    every_triton_entry_point()
    names = {name for name, _, _ in launches}
    assert len(names) >= 16, sorted(names)  # every family's kernels were launched
    for name, guards, devices in launches:
        assert guards, f"{name} launched outside a device guard"
        assert devices == {guards[-1]}, f"{name}: guard {guards[-1]}, tensors on {devices}"
