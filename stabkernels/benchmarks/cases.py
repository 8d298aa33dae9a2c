"""Benchmark cases of every family. A case names the op, the shape, the dtype, the bytes one pass over its
inputs moves, the torch baseline it must beat, and one callable per backend that serves it here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .. import backend as _backend


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    nbytes: int  # bytes one pass over the inputs moves: GB/s = nbytes / time
    baseline: Callable[[], object]
    candidates: dict[str, Callable[[], object]] = field(default_factory=dict)
    baseline_name: str = "torch"
    peak_mb: dict[str, float] = field(default_factory=dict)  # extra peak memory per candidate ("baseline" too)
    statistic: str = "median"  # "mean" where calls alternate cheap and expensive ones (every=N)
    min_rounds: int = 5  # more for small differences between slow calls, where 5 medians are too noisy
    compile_baseline: bool = True  # --compile also times torch.compile(baseline) (not for whole training steps)


def kernel_backends(op: str, device: str) -> list[str]:
    """Compiled backends that serve ``op`` natively on ``device`` (the Triton interpreter is not timed)."""
    names = ("cpp",) if device == "cpu" else ("cuda", "triton")
    return [b for b in names if _backend.why_unavailable(b, device, op) is None]


def spread_cases(device: str, quick: bool) -> Iterator[Case]:
    from .. import spread

    shapes = [(256, 4000)] if quick else [(2048, 32000)]
    for n, c in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, c, device=device, dtype=dtype)
            yield Case(
                op="row_spread", shape=f"{n}x{c}", dtype=str(dtype).replace("torch.", ""),
                nbytes=x.numel() * x.element_size(),
                baseline=lambda x=x: (x.amax(1) - x.amin(1)).max(),
                baseline_name="(x.amax(1) - x.amin(1)).max()",
                candidates={b: (lambda x=x, b=b: spread.row_spread(x, "max", backend=b))
                            for b in kernel_backends("row_spread", device)},
            )


def gpt2_weight_shapes(quick: bool) -> list[tuple[int, int]]:
    """Weight matrices of a GPT-2-small-like stack: 12 layers x {768x2304, 768x768, 768x3072, 3072x768}."""
    d, layers = (128, 2) if quick else (768, 12)
    return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * layers


def resnet18_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-18 (11,689,512 parameters), without torchvision."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            c_in = cin if block == 0 else cout
            shapes += [(cout, c_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or c_in != cout):
                shapes += [(cout, c_in, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes + [(1000, 512), (1000,)]


def spectral_cases(device: str, quick: bool) -> Iterator[Case]:
    import torch.nn.functional as F

    from .. import spectral
    from ..optim import PSS
    from ..optim.pss import global_grad_norm

    shapes = gpt2_weight_shapes(quick)
    label = f"gpt2{'-quick' if quick else ''}:{len(shapes)} mats"
    mats = [torch.randn(m, n, device=device) for m, n in shapes]
    nbytes = sum(w.numel() * w.element_size() for w in mats)
    us, vs = spectral.init_power_vectors(mats, torch.Generator().manual_seed(0))

    def torch_loop():
        # returns u, v: a result nobody reads torch.compile drops (0.45 ms); the in-place form, u.copy_(...),
        # crashes torch 2.13's inductor on AVX-512 ("double free or corruption")
        out = []
        for w, v in zip(mats, vs):
            u = F.normalize(torch.mv(w, v), dim=0, eps=1e-12)
            out.append((u, F.normalize(torch.mv(w.t(), u), dim=0, eps=1e-12)))
        return out

    def clone():
        for w in mats:
            w.clone()

    yield Case(op="sq_norms", shape=label, dtype="float32", nbytes=nbytes,
               baseline=lambda: [w.pow(2).sum() for w in mats], baseline_name="per-tensor w.pow(2).sum()",
               candidates={b: (lambda b=b: spectral.sq_norms(mats, backend=b))
                           for b in kernel_backends("sq_norms", device)})

    candidates = {b: (lambda b=b: spectral.power_iteration_(mats, us, vs, 1, check_finite=False, backend=b))
                  for b in kernel_backends("power_iteration_", device)}
    candidates["ref:clone-same-bytes"] = clone
    yield Case(op="power_iteration_", shape=label, dtype="float32", nbytes=nbytes, baseline=torch_loop,
               baseline_name="per-matrix loop: mv, normalize, mv, normalize", candidates=candidates)

    # Optimizer step time (gradients fixed, no forward/backward): PSS around AdamW(foreach) against plain.
    def make_params():
        g = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(m, n, generator=g).to(device) * 0.02) for m, n in shapes]
        ps += [torch.nn.Parameter(torch.zeros(m, device=device)) for m, _ in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
        return ps

    # all four step the same parameters, gradients and AdamW state (share_state)
    ps = make_params()
    plain = torch.optim.AdamW(ps, lr=1e-4, foreach=True)
    quiet = PSS(torch.optim.AdamW(ps, lr=1e-4, foreach=True), trigger=None)
    fired = PSS(torch.optim.AdamW(ps, lr=1e-4, foreach=True), trigger=None, every=1)
    # a training loop that clips already has the gradient norm: step(grad_norm=...) skips PSS's own pass
    given = PSS(torch.optim.AdamW(ps, lr=1e-4, foreach=True), trigger=None)
    for opt in (plain, quiet.optimizer, fired.optimizer, given.optimizer):
        opt.step()
    share_state(plain, quiet.optimizer, fired.optimizer, given.optimizer)
    norm = float(global_grad_norm(given.params()))
    step_bytes = sum(p.numel() * 4 for g in plain.param_groups for p in g["params"])
    yield Case(op="pss_adamw_step", compile_baseline=False, shape=label, dtype="float32", nbytes=step_bytes, baseline=plain.step,
               baseline_name="torch.optim.AdamW(foreach=True).step()",
               candidates={"pss-untriggered": quiet.step, "pss-triggered": fired.step,
                           "pss-untriggered-grad_norm-given": lambda: given.step(grad_norm=norm)},
               min_rounds=5 if quick else 30)  # a ~3% difference between ~200 ms steps


def peak_extra_mb(setup: str, statement: str) -> float:
    """Peak resident memory a statement adds, in MB, measured in a fresh process (CPU tensors have no
    allocator statistics): RSS before the statement against the high-water mark after it. The high-water
    mark is VmHWM of the process's own address space; ru_maxrss would not do, because Linux carries it over
    from the parent through fork and exec."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch, stabkernels
        {setup}
        def status_kb(key):
            with open('/proc/self/status') as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))
        before = status_kb('VmRSS')
        {statement}
        print((status_kb('VmHWM') - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return max(0.0, float(out.stdout.strip().splitlines()[-1]))


def radius_cases(device: str, quick: bool) -> Iterator[Case]:
    from .. import spread

    # tangent_spread_linear against materialise-then-reduce (time and extra peak memory)
    n, d, v = (256, 128, 1024) if quick else (2048, 768, 8192)
    g = torch.Generator().manual_seed(0)
    h, hd = (torch.randn(n, d, generator=g).to(device) for _ in range(2))
    w, wd = (torch.randn(v, d, generator=g).to(device) * 0.02 for _ in range(2))
    bd = torch.randn(v, generator=g).to(device)

    def materialise():
        z = torch.addmm(bd, hd, w.T)
        z.addmm_(h, wd.T)
        return (z.amax(1) - z.amin(1)).max()

    case = Case(op="tangent_spread_linear", shape=f"N{n}xd{d}xV{v}", dtype="float32",
                nbytes=(2 * n * d + 2 * v * d + v) * 4, baseline=materialise,
                baseline_name="addmm into (N, V), addmm_, (z.amax(1) - z.amin(1)).max()",
                candidates={b: (lambda b=b: spread.tangent_spread_linear(h, hd, w, wd, bd, backend=b))
                            for b in kernel_backends("tangent_spread_linear", device)})
    if device == "cpu":
        setup = (f"g = torch.Generator().manual_seed(0); h, hd = (torch.randn({n}, {d}, generator=g) for _ in range(2)); "
                 f"w, wd = (torch.randn({v}, {d}, generator=g) * 0.02 for _ in range(2)); bd = torch.randn({v}, generator=g)")
        case.peak_mb["baseline"] = peak_extra_mb(
            setup, "z = torch.addmm(bd, hd, w.T); z.addmm_(h, wd.T); r = (z.amax(1) - z.amin(1)).max(); del z")
        for b in case.candidates:
            case.peak_mb[b] = peak_extra_mb(
                setup, f"r = stabkernels.tangent_spread_linear(h, hd, w, wd, bd, backend='{b}')")
    yield case

    yield from radius_train_step_cases(device, quick)


def radius_train_step_cases(device: str, quick: bool) -> Iterator[Case]:
    """A full training step (forward, backward, radius probe, update) against plain Adam's, on two small CNNs:
    a ResNet in the CIFAR style (convolutions dominate, as in the paper's ResNet-18) and a max-pooling CNN
    (torch's CPU max-pooling dominates its forward, which then costs 60% of the step)."""
    from ..optim import RadiusAdamW, RadiusController

    batch = 32 if quick else 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def train_step(model, opt, with_inputs):
        return cnn_train_step(model, opt, x, y, (lambda loss: opt.step(x)) if with_inputs else None)

    for op, make in (("train_step_small_resnet", small_resnet), ("train_step_small_cnn", small_cnn)):
        model = lambda: make(device)  # noqa: E731
        candidates = {}
        for method in ("fd", "jvp"):
            m1, m2 = model(), model()
            candidates[f"RadiusController-{method}"] = train_step(
                m1, RadiusController(torch.optim.Adam(m1.parameters(), lr=1e-3), m1, method=method, every=1), True)
            candidates[f"RadiusAdamW-{method}"] = train_step(
                m2, RadiusAdamW(m2.parameters(), lr=1e-3, weight_decay=0.0, model=m2, method=method, every=1), True)
        # finite differences on the eval-mode function: f(theta) needs a forward of its own (two in all)
        m3 = model()
        candidates["RadiusAdamW-fd-eval"] = train_step(
            m3, RadiusAdamW(m3.parameters(), lr=1e-3, weight_decay=0.0, model=m3, method="fd", probe_mode="eval",
                            every=1), True)
        # the defaults: fd every 16th step and after a capped one (bench/radius_cost.py has the other levers)
        m5 = model()
        candidates["RadiusAdamW-default"] = train_step(
            m5, RadiusAdamW(m5.parameters(), lr=1e-3, weight_decay=0.0, model=m5), True)
        if op == "train_step_small_cnn":
            # the knobs that trade measurement for time: a radius every other step, half the batch
            for label, kw in (("every=2", dict(every=2)), (f"samples={batch // 2}", dict(samples=batch // 2, every=1))):
                m4 = model()
                candidates[f"RadiusAdamW-jvp-{label}"] = train_step(
                    m4, RadiusAdamW(m4.parameters(), lr=1e-3, weight_decay=0.0, model=m4, method="jvp", **kw), True)
        m0 = model()
        nparams = sum(p.numel() for p in m0.parameters())
        yield Case(op=op, shape=f"batch{batch}x3x32x32:{nparams}params", dtype="float32", nbytes=nparams * 4,
                   baseline=train_step(m0, torch.optim.Adam(m0.parameters(), lr=1e-3), False),
                   baseline_name="forward + backward + torch.optim.Adam.step()", candidates=candidates,
                   statistic="mean", min_rounds=5 if quick else 20,  # steps of this VM vary 10-20% run to run
                   compile_baseline=False)


def cnn_train_step(model, opt, x, y, step: Callable[[torch.Tensor], object] | None = None) -> Callable[[], None]:
    """One training step on a fixed batch: zero the gradients, cross-entropy forward and backward, then
    ``step(loss)`` (default: ``opt.step()``)."""
    from torch.nn import functional as F

    def fn():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step() if step is None else step(loss)
    return fn


def small_cnn(device: str, seed: int = 0):
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).to(device)


class _BasicBlock(torch.nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, and a projected shortcut when the shape
    changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        from torch import nn

        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def small_resnet(device: str, seed: int = 0):
    """A CIFAR-style ResNet-8 (He et al.'s 16/32/64 widths, one basic block per stage; 78k parameters)."""
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         _BasicBlock(16, 16, 1), _BasicBlock(16, 32, 2), _BasicBlock(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).to(device)


def resnet18_case_shapes(quick: bool) -> tuple[list[tuple[int, ...]], str]:
    """ResNet-18's parameter shapes (each dimension / 8 when quick) and their bench label."""
    shapes = resnet18_shapes()
    if quick:
        shapes = [tuple(max(1, d // 8) for d in s) for s in shapes]
    return shapes, f"resnet18{'/8' if quick else ''}:{sum(math.prod(s) for s in shapes)}params"


def share_state(first: torch.optim.Optimizer, *others: torch.optim.Optimizer) -> None:
    """Points the state of ``others`` (optimizers over the same parameters as ``first``, each stepped once) at
    ``first``'s tensors, so that every candidate of a case steps the same memory. On separate copies the same
    kernel was timed up to 13% apart from one copy to the other (AVX2 SGD step, one Zen 4 core: where the
    allocator put them), more than the differences between the candidates being measured."""
    for opt in others:
        for p, state in first.state.items():
            opt.state[p] = dict(state)


def update_cases(device: str, quick: bool) -> Iterator[Case]:
    """The fused updates alone against torch's multi-tensor (foreach) and fused optimizers on ResNet-18's
    parameters; every candidate of a case steps the same parameters, gradients and state tensors."""
    from .. import update

    shapes, label = resnet18_case_shapes(quick)
    gen = torch.Generator().manual_seed(0)

    def tensors(scale: float) -> list[torch.Tensor]:
        return [(torch.randn(s, generator=gen) * scale).to(device) for s in shapes]

    def params_with_grads() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(t) for t in tensors(0.02)]
        for p, gr in zip(ps, tensors(1e-3)):
            p.grad = gr
        return ps

    param_bytes = sum(math.prod(s) * 4 for s in shapes)
    lr, wd = 1e-3, 1e-2

    ps = params_with_grads()
    grads = [p.grad for p in ps]
    adamw, fused_adamw = (torch.optim.AdamW(ps, lr=lr, weight_decay=wd, **kind)
                          for kind in ({"foreach": True}, {"fused": True}))
    adamw.step(), fused_adamw.step()
    share_state(adamw, fused_adamw)
    exp_avgs = [adamw.state[p]["exp_avg"] for p in ps]
    exp_avg_sqs = [adamw.state[p]["exp_avg_sq"] for p in ps]
    candidates = {b: (lambda b=b: update.adam_step_(ps, grads, exp_avgs, exp_avg_sqs, step=10, lr=lr,
                                                   weight_decay=wd, backend=b))
                  for b in kernel_backends("adam_step_", device)}
    # torch's own fused kernel (one pass, like ours) is the fair comparison where it exists
    candidates["ref:AdamW(fused=True)"] = fused_adamw.step
    yield Case(op="adam_step_", shape=label, dtype="float32", nbytes=4 * param_bytes, baseline=adamw.step,
               baseline_name="torch.optim.AdamW(foreach=True).step()", candidates=candidates)

    ps = params_with_grads()
    grads = [p.grad for p in ps]
    sgd, fused_sgd = (torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=wd, **kind)
                      for kind in ({"foreach": True}, {"fused": True}))
    sgd.step(), fused_sgd.step()  # momentum buffers exist: the timed steps are all steady-state ones
    share_state(sgd, fused_sgd)
    bufs = [sgd.state[p]["momentum_buffer"] for p in ps]
    candidates = {b: (lambda b=b: update.sgd_step_(ps, grads, bufs, lr=lr, momentum=0.9, weight_decay=wd, backend=b))
                  for b in kernel_backends("sgd_step_", device)}
    candidates["ref:SGD(fused=True)"] = fused_sgd.step
    yield Case(op="sgd_step_", shape=label, dtype="float32", nbytes=3 * param_bytes, baseline=sgd.step,
               baseline_name="torch.optim.SGD(momentum=0.9, foreach=True).step()", candidates=candidates)

    ps, updates = tensors(0.02), tensors(1.0)

    def foreach_apply():
        torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_add_(ps, updates, alpha=-lr)

    yield Case(op="apply_update_", shape=label, dtype="float32", nbytes=2 * param_bytes, baseline=foreach_apply,
               baseline_name="torch._foreach_mul_ + torch._foreach_add_",
               candidates={b: (lambda b=b: update.apply_update_(ps, updates, lr, wd, backend=b))
                           for b in kernel_backends("apply_update_", device)})


def directional_cases(device: str, quick: bool) -> Iterator[Case]:
    from torch.nn import functional as F

    from .. import directional
    from ..optim import SAdam

    shapes, label = resnet18_case_shapes(quick)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    k = 8

    def torch_loop():
        out = []
        for _ in range(k):
            total = 0.0
            for gr in grads:
                d = torch.randn_like(gr)
                d = d / (d.norm() + 1e-12)
                total = total + torch.dot(gr.flatten(), d.flatten())
            out.append(total)
        return out

    yield Case(op="directional_dots", shape=f"{label},K{k}", dtype="float32",
               nbytes=sum(x.numel() * 4 for x in grads), baseline=torch_loop,
               baseline_name="per probe per tensor: randn_like, normalise, dot",
               candidates={b: (lambda b=b: directional.directional_dots(grads, 1, k, backend=b))
                           for b in kernel_backends("directional_dots", device)})

    def torch_directions():
        out = []
        for gr in grads:
            d = torch.randn_like(gr)
            out.append(d / (d.norm() + 1e-12))
        return out

    yield Case(op="random_directions", shape=label, dtype="float32", nbytes=sum(x.numel() * 4 for x in grads),
               baseline=torch_directions, baseline_name="per tensor: randn_like, normalise",
               candidates={b: (lambda b=b: directional.random_directions(grads, 1, 0, backend=b))
                           for b in kernel_backends("random_directions", device)})

    # a 2-way FSDP2 shard of each tensor: its second half, from an offset inside a Philox group of 4
    offsets = [x.numel() // 2 | 1 for x in grads]
    halves = [torch.empty(x.numel() - o, device=device) for x, o in zip(grads, offsets)]
    keys = directional.key_table(1, [0], len(grads))[0]

    def torch_shard_normals():
        return [torch.randn_like(h) for h in halves]

    yield Case(op="shard_normals", shape=f"{label}:second halves", dtype="float32",
               nbytes=sum(h.numel() * 4 for h in halves), baseline=torch_shard_normals,
               baseline_name="per shard: randn_like",
               candidates={b: (lambda b=b: torch.ops.stabkernels.shard_normals(halves, keys, offsets, b))
                           for b in kernel_backends("shard_normals", device)})

    params = [torch.randn(s_, generator=g).to(device) * 0.02 for s_ in shapes]
    scratch = [torch.empty_like(p) for p in params]

    def torch_perturb():
        out = []
        for p in params:
            d = torch.randn_like(p)
            out.append(p + 0.01 * d / (d.norm() + 1e-12))
        return out

    yield Case(op="perturb", shape=label, dtype="float32", nbytes=sum(p.numel() * 4 for p in params),
               baseline=torch_perturb, baseline_name="per tensor: randn_like, normalise, p + sigma d",
               candidates={b: (lambda b=b: directional.perturb(params, 1, 0, 0.01, out=scratch, backend=b))
                           for b in kernel_backends("perturb", device)})

    def with_grads():
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        return ps

    ortho_ps, ref_ps = with_grads(), with_grads()

    def torch_orthograd():
        for p in ref_ps:
            w, gr = p.detach(), p.grad
            perp = gr - (w * gr).sum() / ((w * w).sum() + 1e-30) * w
            p.grad = perp * (gr.norm() / (perp.norm() + 1e-30))

    yield Case(op="orthograd_", shape=label, dtype="float32", nbytes=2 * sum(p.numel() * 4 for p in params),
               baseline=torch_orthograd, baseline_name="per tensor: project, rescale (torch ops)",
               candidates={b: (lambda b=b: directional.orthograd_(ortho_ps, backend=b))
                           for b in kernel_backends("orthograd_", device)})

    # SAdam's step without its probe forwards, against AdamW(foreach=True), on the same parameters
    def params_with_grads():
        gg = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gg).to(device) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gg).to(device) * 1e-3
        return ps

    plain = torch.optim.AdamW(params_with_grads(), lr=1e-3, foreach=True)
    update_only = SAdam(params_with_grads(), lr=1e-3, probes=0, probe_mode="train")
    free_closure = SAdam(params_with_grads(), lr=1e-3, probes=k, probe_mode="train")
    zero = torch.zeros((), device=device)
    yield Case(op="sadam_step_without_forwards", compile_baseline=False, shape=label, dtype="float32",
               nbytes=sum(p.numel() * 4 for p in plain.param_groups[0]["params"]), baseline=plain.step,
               baseline_name="torch.optim.AdamW(foreach=True).step()",
               candidates={"sadam-update": update_only.step,
                           f"sadam-update+{k}-perturbations": lambda: free_closure.step(probe_closure=lambda: zero, loss=zero)})

    # The S-Adam algorithm itself with a free probe closure (what the probes cost besides the forwards): ours
    # against the same steps in eager torch (k perturbed copies into scratch, slopes, rho, the damped AdamW).
    from ..optim.sadam import damping_factor, lgi

    eager_ps = params_with_grads()
    eager_adamw = torch.optim.AdamW(eager_ps, lr=1e-3, foreach=True)
    eager_scratch = [torch.empty_like(p) for p in eager_ps]
    sigma = 0.01

    def eager_sadam_step():
        values = []
        with torch.no_grad():
            for _ in range(k):
                for p, s in zip(eager_ps, eager_scratch):
                    d = torch.randn_like(p)
                    torch.addcmul(p, d, sigma / (d.norm() + 1e-12), out=s)
                values.append(zero)  # the free closure
            D = (torch.stack(values).double() - zero.double()) / sigma
            alpha = damping_factor(lgi(D), 2.0)
        eager_adamw.param_groups[0]["lr"] = 1e-3 * float(alpha)
        eager_adamw.step()

    yield Case(op=f"sadam_step_free_closure_k{k}", compile_baseline=False, shape=label, dtype="float32",
               nbytes=sum(p.numel() * 4 for p in eager_ps), baseline=eager_sadam_step,
               baseline_name=f"S-Adam in eager torch: {k} x (randn_like, normalise, addcmul into scratch), rho, AdamW(foreach)",
               candidates={"SAdam": lambda: free_closure.step(probe_closure=lambda: zero, loss=zero)})

    # a full training step of the small CNN: AdamW against SAdam with k = 8 and k = 2 probes
    batch = 32 if quick else 128
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def train_step(model, opt, sadam):
        closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
        return cnn_train_step(model, opt, x, y, (lambda loss: opt.step(probe_closure=closure, loss=loss)) if sadam else None)

    m0 = small_cnn(device)
    candidates = {}
    for probes in (8, 2):
        m = small_cnn(device)
        candidates[f"SAdam-k{probes}"] = train_step(m, SAdam(m, lr=1e-3, probes=probes), True)
    nparams = sum(p.numel() for p in m0.parameters())
    yield Case(op="train_step_small_cnn_sadam", compile_baseline=False, shape=f"batch{batch}x3x32x32:{nparams}params", dtype="float32",
               nbytes=nparams * 4, baseline=train_step(m0, torch.optim.AdamW(m0.parameters(), lr=1e-3), False),
               baseline_name="forward + backward + torch.optim.AdamW.step()", candidates=candidates)


def loss_cases(device: str, quick: bool) -> Iterator[Case]:
    from torch.nn import functional as F

    from .. import losses

    n, v = (256, 4000) if quick else (2048, 32000)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=g).to(device).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)

    def composed():
        z.grad = None
        (F.cross_entropy(z, y) + 1e-4 * torch.logsumexp(z, 1).pow(2).mean()).backward()

    def fused(b):
        def fn():
            z.grad = None
            losses.cross_entropy_z_loss(z, y, backend=b)[0].backward()
        return fn

    backends = kernel_backends("cross_entropy_z_loss", device)
    case = Case(op="cross_entropy_z_loss_fwd_bwd", shape=f"{n}x{v}", dtype="float32", nbytes=n * v * 4,
                baseline=composed, baseline_name="F.cross_entropy + 1e-4 * logsumexp^2, forward + backward",
                candidates={b: fused(b) for b in backends})
    if device == "cpu":
        setup = (f"import torch.nn.functional as F; g = torch.Generator().manual_seed(0); "
                 f"z = torch.randn({n}, {v}, generator=g).requires_grad_(); y = torch.randint(0, {v}, ({n},), generator=g)")
        case.peak_mb["baseline"] = peak_extra_mb(
            setup, "(F.cross_entropy(z, y) + 1e-4 * torch.logsumexp(z, 1).pow(2).mean()).backward()")
        for b in backends:
            case.peak_mb[b] = peak_extra_mb(setup, f"stabkernels.cross_entropy_z_loss(z, y, backend='{b}')[0].backward()")
    yield case

    def stable_composed():
        z.grad = None
        s = losses.stablemax_s(z)
        (torch.log(s.sum(1)) - torch.log(s.gather(1, y[:, None])[:, 0])).mean().backward()

    def stable_fused(b):
        def fn():
            z.grad = None
            losses.stablemax_cross_entropy(z, y, backend=b).backward()
        return fn

    yield Case(op="stablemax_cross_entropy_fwd_bwd", shape=f"{n}x{v}", dtype="float32", nbytes=n * v * 4,
               baseline=stable_composed, baseline_name="StableMax formula in torch ops, forward + backward",
               candidates={b: stable_fused(b) for b in kernel_backends("stablemax_cross_entropy", device)})

    yield _linear_ce_case(device, quick, g)


def _linear_ce_case(device: str, quick: bool, g: torch.Generator) -> Case:
    """linear_cross_entropy's case of :func:`loss_cases`, in a function of its own: its n, v and y would
    otherwise rebind the names the earlier cases' closures read when they run (pytest-benchmark collects every
    case before timing any)."""
    from torch.nn import functional as F

    from .. import losses

    # linear_cross_entropy (SPEC 4.6): the head's logits never exist; the ratios (8192 tokens x 4096
    # hidden x 32k vocabulary on GPU) scaled down on CPU
    n, d, v = (256, 128, 1024) if quick else ((8192, 4096, 32768) if device == "cuda" else (1024, 512, 16384))
    h = torch.randn(n, d, generator=g).to(device).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.02).to(device).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)

    def linear_composed():
        h.grad = w.grad = None
        F.cross_entropy(F.linear(h, w), y).backward()

    def linear_fused(b):
        def fn():
            h.grad = w.grad = None
            losses.linear_cross_entropy(h, w, y, backend=b)[0].backward()
        return fn

    backends = kernel_backends("cross_entropy_z_loss", device)
    case = Case(op="linear_cross_entropy_fwd_bwd", shape=f"N{n}xH{d}xV{v}", dtype="float32",
                nbytes=(n * d + v * d) * 4, baseline=linear_composed,
                baseline_name="F.cross_entropy(F.linear(h, W), y), forward + backward",
                candidates={b: linear_fused(b) for b in backends})
    if device == "cpu":
        setup = (f"import torch.nn.functional as F; g = torch.Generator().manual_seed(0); "
                 f"h = torch.randn({n}, {d}, generator=g).requires_grad_(); "
                 f"w = (torch.randn({v}, {d}, generator=g) * 0.02).requires_grad_(); "
                 f"y = torch.randint(0, {v}, ({n},), generator=g)")
        case.peak_mb["baseline"] = peak_extra_mb(setup, "F.cross_entropy(F.linear(h, w), y).backward()")
        for b in backends:
            case.peak_mb[b] = peak_extra_mb(setup, f"stabkernels.linear_cross_entropy(h, w, y, backend='{b}')[0].backward()")
    return case


def hf_train_step_cases(device: str, quick: bool) -> Iterator[Case]:
    """What the probes cost in a Hugging Face training step: forward with labels, backward and ``step()`` of a
    tiny GPT-2 (dropout on) built from a config, as Trainer runs it, against ``torch.optim.AdamW``'s step.
    Skipped when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return
    from ..optim import RadiusAdamW, SAdam

    seq, batch = (32, 4) if quick else (128, 8)
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def gpt2():
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=256, n_positions=seq, n_embd=64 if quick else 128,
                                         n_layer=2 if quick else 4, n_head=4)
        return transformers.GPT2LMHeadModel(config).to(device).train()

    def trainer_step(model, opt):
        def fn():
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return fn

    candidates = {}
    for label, make in (
            ("RadiusAdamW-default", lambda m: RadiusAdamW(m.parameters(), lr=1e-4, model=m)),
            ("RadiusAdamW-jvp", lambda m: RadiusAdamW(m.parameters(), lr=1e-4, model=m, method="jvp", every=1)),
            ("RadiusAdamW-fd", lambda m: RadiusAdamW(m.parameters(), lr=1e-4, model=m, method="fd", every=1)),
            ("RadiusAdamW-jvp-head", lambda m: RadiusAdamW(m.parameters(), lr=1e-4, model=m, head=m.lm_head,
                                                           every=1)),
            ("SAdam-k8", lambda m: SAdam(m, lr=1e-4)),
            ("SAdam-k2", lambda m: SAdam(m, lr=1e-4, probes=2))):
        m = gpt2()
        candidates[label] = trainer_step(m, make(m))
    m0 = gpt2()
    nparams = sum(p.numel() for p in m0.parameters())
    yield Case(op="hf_gpt2_train_step", compile_baseline=False, shape=f"batch{batch}x{seq}:{nparams}params",
               dtype="float32", nbytes=nparams * 4,
               baseline=trainer_step(m0, torch.optim.AdamW(m0.parameters(), lr=1e-4)),
               baseline_name="GPT-2 forward(labels) + backward + torch.optim.AdamW.step()", candidates=candidates,
               statistic="mean", min_rounds=3 if quick else 10)


def defense_cases(device: str, quick: bool) -> Iterator[Case]:
    """Skip-step and update clipping (issue 27) against the best torch peer on ResNet-18's parameters: a step of
    SkipStep around torch's fused AdamW (the skip through ``found_inf``) and around our StableAdamW (the skip flag
    folded into the fused kernels, SPEC 7.1), and StableAdamW's fused two-pass step (SPEC 7.2), against
    AdamW(fused=True).step() alone (the issue's goals: within 5% and 10%). ``grad_norm=`` is the norm a training
    loop that clips already has (clip_grad_norm_), so SkipStep computes none; without it, SkipStep reads the
    gradients once more for the norm. Peers and references: an eager per-tensor StableAdamW (optimi-style, in
    torch ops); SkipStep(StableAdamW) on the snapshot path (parameters and state copied and selected back: what
    SkipStep did for our optimizers before the flag)."""
    from ..optim import SkipStep, StableAdamW
    from ..optim.skipstep import stable_adamw_reference

    shapes, label = resnet18_case_shapes(quick)
    param_bytes = sum(math.prod(s) * 4 for s in shapes)
    lr, wd = 1e-3, 1e-2

    def params_with_grads(seed: int) -> list[torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(seed)
        ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        return ps

    # Losses and norms within 2 sigma of their window's mean, cycled: every timed step runs the whole rule and is
    # kept (a constant series has std 0, which OLMo-core's rule reads as a spike: every step would be skipped)
    gen = torch.Generator().manual_seed(5)
    noise = [(1 + 0.01 * torch.rand((), generator=gen)).to(device) for _ in range(64)]
    k = [0]

    def value() -> torch.Tensor:
        k[0] += 1
        return noise[k[0] % 64]

    def warm(skip: SkipStep) -> SkipStep:
        for _ in range(150):  # past the warm-up and a whole window: the timed steps run the whole rule
            skip.step(loss=value(), grad_norm=value())
        assert int(skip.skipped_steps()) == 0
        return skip

    def rotating(skip: SkipStep) -> Callable:
        """step(loss) with SkipStep computing the gradient norm: the gradients alternate between two sets (one
        Python attribute assignment per parameter per call), else the norm series would be constant."""
        ps = skip.params()
        sets = [[p.grad for p in ps], [p.grad * 1.01 for p in ps]]

        def step():
            for p, g in zip(ps, sets[k[0] % 2]):
                p.grad = g
            skip.step(loss=value())
            for p, g in zip(ps, sets[0]):  # the shared parameters keep the baseline's gradients
                p.grad = g
        for _ in range(150):
            step()
        assert int(skip.skipped_steps()) == 0
        return step

    # Every candidate steps the baseline's own parameters and gradients (SkipStep around AdamW wraps the
    # baseline optimizer itself), so the ratios measure the candidates and not where their memory lies:
    # separately allocated copies of the same shapes differed by up to 3% in step time on the CPU VMs here.
    fused = torch.optim.AdamW(params_with_grads(0), lr=lr, weight_decay=wd, fused=True)
    shared = fused.param_groups[0]["params"]
    skip = warm(SkipStep(fused, window=128))
    skip_norm = rotating(SkipStep(fused, window=128))
    skip_stable = warm(SkipStep(StableAdamW(shared, lr=lr, weight_decay=wd), window=128))
    snapshot_inner = StableAdamW(params_with_grads(4), lr=lr, weight_decay=wd)
    snapshot_inner.accepts_skip = False  # the path SkipStep took for our optimizers before the skip flag
    skip_snapshot = warm(SkipStep(snapshot_inner, window=128))
    fused.step()
    yield Case(op="skip_step", shape=label, dtype="float32", nbytes=7 * param_bytes, baseline=fused.step,
               baseline_name="torch.optim.AdamW(fused=True).step()",
               candidates={"SkipStep(AdamW(fused=True)).step(loss, grad_norm)":
                               lambda: skip.step(loss=value(), grad_norm=value()),
                           "SkipStep(AdamW(fused=True)).step(loss), norm computed": skip_norm,
                           "SkipStep(StableAdamW).step(loss, grad_norm)":
                               lambda: skip_stable.step(loss=value(), grad_norm=value()),
                           "ref:SkipStep(StableAdamW) on the snapshot (clone) path, step(loss, grad_norm)":
                               lambda: skip_snapshot.step(loss=value(), grad_norm=value())},
               compile_baseline=False)

    stable = StableAdamW(shared, lr=lr, weight_decay=wd)
    stable.step()
    ps = params_with_grads(2)
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    t = [0]

    @torch.no_grad()
    def eager_stable():
        t[0] += 1
        for p, m, v in zip(ps, ms, vs):
            stable_adamw_reference(p, p.grad, m, v, t[0], lr, (0.9, 0.999), 1e-8, wd)

    yield Case(op="stable_adamw", shape=label, dtype="float32", nbytes=7 * param_bytes, baseline=fused.step,
               baseline_name="torch.optim.AdamW(fused=True).step()",
               candidates={"StableAdamW.step()": stable.step, "ref:eager per-tensor StableAdamW": eager_stable},
               compile_baseline=False)


# --- attention (SPEC 8.1)

def attention_cases(device: str, quick: bool) -> Iterator[Case]:
    """qk_max_logits against materialising every head's scores (q @ k^T, causal mask, amax): time and extra peak
    memory (the (B, H, T, T) scores against none)."""
    from .. import attention

    b, h, t, d = (1, 4, 512, 64) if quick else (1, 8, 2048, 64)
    scale = 1 / math.sqrt(d)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, h, t, d, generator=g).to(device) for _ in range(2))
    future = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)

    def materialise():
        return (q @ k.transpose(-1, -2) * scale).masked_fill(future, float("-inf")).amax(dim=(2, 3))

    case = Case(op="qk_max_logits", shape=f"B{b}xH{h}xT{t}xD{d}", dtype="float32", nbytes=2 * q.numel() * 4,
                baseline=materialise, baseline_name="(q @ k^T * scale).masked_fill(causal).amax((2, 3))",
                candidates={be: (lambda be=be: attention.qk_max_logits(q, k, backend=be))
                            for be in kernel_backends("qk_max_logits", device)})
    if device == "cpu":
        setup = (f"g = torch.Generator().manual_seed(0); q, k = (torch.randn({b}, {h}, {t}, {d}, generator=g) "
                 f"for _ in range(2)); f = torch.ones({t}, {t}, dtype=torch.bool).triu(1)")
        case.peak_mb["baseline"] = peak_extra_mb(
            setup, f"r = (q @ k.transpose(-1, -2) * {scale}).masked_fill(f, float('-inf')).amax(dim=(2, 3))")
        for be in case.candidates:
            case.peak_mb[be] = peak_extra_mb(setup, f"r = stabkernels.qk_max_logits(q, k, backend='{be}')")
    yield case


FAMILIES: dict[str, Callable[[str, bool], Iterator[Case]]] = {
    "spread": spread_cases,
    "spectral": spectral_cases,
    "radius": radius_cases,
    "update": update_cases,
    "directional": directional_cases,
    "losses": loss_cases,
    "hf": hf_train_step_cases,
    "defenses": defense_cases,
    "attention": attention_cases,
}
