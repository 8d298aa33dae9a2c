"""Non-normal amplification of optimizer dynamics: rho(J) and kappa(V) (SPEC 5).

Around the current point (the preconditioner frozen over a step) an optimizer's update is linear with operator
J. Its spectral radius rho(J) says whether errors shrink in the long run; the condition number kappa(V) of its
(unit-column) eigenvector matrix bounds the transient growth on the way, ||J^t|| <= kappa(V) rho(J)^t, and by
Bauer-Fike the warning rule rho(J) + eps kappa(V) >= 1 flags when a perturbation of size eps (J changing from
step to step) can push the dynamics past the edge.

The operators (SPEC 5; the Adam ones are a reconstruction):
  GD / SGD:            J = I - eta H (+ (1 - eta wd) I for weight decay); symmetric, kappa = 1.
  momentum SGD:        b <- mu b + g, theta <- theta - eta b: J = [[I - eta H, -eta mu I], [H, mu I]].
  Adam, beta1 = 0:     J = I - eta M H, M = diag(1 / (sqrt(v_hat) + eps)); kappa(V) <= sqrt(max M / min M).
  Adam, beta1 > 0:     J = [[I - eta (1 - b1) M H, -eta b1 M], [(1 - b1) H, b1 I]].
AdamW's decoupled decay multiplies the theta block's identity by (1 - eta wd).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

# --------------------------------------------------------------------------------------------------
# closed forms


@dataclass
class KappaResult:
    rho: float  # spectral radius of J
    kappa: float  # condition number of J's unit-column eigenvector matrix (inf at an exceptional point)
    per_eigenvalue: Tensor | None = None  # kappa of each 2x2 block (momentum closed form)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm()


def kappa_momentum(eigenvalues, lr: float, momentum: float) -> KappaResult:
    """rho(J) and kappa(V) of momentum SGD (b <- mu b + g, theta <- theta - eta b) in closed form, from the
    Hessian's eigenvalues (SPEC 5).

    In H's eigenbasis J splits into 2 x 2 blocks [[1 - eta l, -eta mu], [l, mu]] with eigenvalues z solving
    z^2 - (1 + mu - eta l) z + mu = 0; with unit eigenvectors x+, x- and c = |x+^H x-|, a block's
    kappa = sqrt((1 + c) / (1 - c)), and kappa(V) is the largest (inf at the exceptional points
    eta l = (1 +- sqrt(mu))^2). The iteration is stable while 0 < eta l < 2 (1 + mu)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
    eta, mu = float(lr), float(momentum)
    kappas = torch.empty_like(lam)
    rho = 0.0
    for i, l in enumerate(lam.tolist()):
        b = 1 + mu - eta * l
        disc = complex(b * b - 4 * mu) ** 0.5
        zs = ((b + disc) / 2, (b - disc) / 2)
        rho = max(rho, abs(zs[0]), abs(zs[1]))
        vecs = []
        for z in zs:
            # null vector of [[1 - eta l - z, -eta mu], [l, mu - z]]: from the row that is not ~zero
            v1 = torch.tensor([z - mu, l], dtype=torch.complex128)
            v2 = torch.tensor([eta * mu, 1 - eta * l - z], dtype=torch.complex128)
            vecs.append(_unit(v1 if v1.norm() >= v2.norm() else v2))
        c = abs(complex(torch.vdot(vecs[0], vecs[1])))
        kappas[i] = math.inf if c >= 1 - 1e-15 else math.sqrt((1 + c) / (1 - c))
    return KappaResult(rho=rho, kappa=float(kappas.max()) if len(kappas) else 1.0, per_eigenvalue=kappas)


def _adam_preconditioners(optimizer: torch.optim.Optimizer):
    """(M per parameter, lr, betas, weight decay, decoupled) from an Adam/AdamW optimizer's state."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and not hasattr(optimizer, "optimizer"):
        raise TypeError(f"expected torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    out = []
    for g in inner.param_groups:
        b1, b2 = g["betas"]
        for p in g["params"]:
            s = inner.state.get(p, {})
            if "exp_avg_sq" not in s:
                raise RuntimeError("the optimizer has no second moments yet: take a step first")
            t = float(s["step"])
            v_hat = s["exp_avg_sq"].double() / (1 - b2 ** t)
            out.append((p, 1 / (v_hat.sqrt() + g["eps"]), g))
    return out


def kappa_adam_bound(optimizer: torch.optim.Optimizer) -> float:
    """sqrt(max M / min M) over all parameters, M = 1 / (sqrt(v_hat) + eps) from the optimizer's second
    moments: a bound on kappa(V) of Adam without momentum (J = I - eta M H is similar to a symmetric
    matrix through M^(1/2)), one min/max reduction over the state (SPEC 5)."""
    lo, hi = math.inf, 0.0
    for _, M, _ in _adam_preconditioners(optimizer):
        mn, mx = torch.aminmax(M)
        lo, hi = min(lo, float(mn)), max(hi, float(mx))
    return math.sqrt(hi / lo)


# --------------------------------------------------------------------------------------------------
# Hessians: dense (small networks) and Lanczos (top eigenvalues from Hessian-vector products)


def _flat_loss(model: nn.Module, loss_fn: Callable, batch):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def f(flat: Tensor) -> Tensor:
        chunks = torch.split(flat, sizes)
        return loss_fn(lambda *a, **k: functional_call(model, {n: c.reshape(s) for n, c, s in
                                                                zip(names, chunks, shapes)}, a, k), batch)

    return f, torch.cat([p.detach().reshape(-1) for p in params]), params


def hessian(model: nn.Module, loss_fn: Callable, batch, dtype=torch.float64) -> Tensor:
    """The full Hessian of ``loss_fn(forward, batch)`` in ``dtype`` (small networks). ``loss_fn`` receives a
    callable that runs the model functionally and the batch, e.g. ``lambda fwd, b: F.cross_entropy(fwd(b[0]),
    b[1])``."""
    f, flat, _ = _flat_loss(model, loss_fn, batch)
    model_dtype = flat.dtype
    with torch.enable_grad():
        return torch.func.hessian(lambda x: f(x.to(model_dtype)))(flat.to(dtype)).to(dtype)


def top_hessian_eigenvalues(model: nn.Module, loss_fn: Callable, batch, k: int = 1, *, iters: int | None = None,
                            seed: int = 0) -> Tensor:
    """The ``k`` largest (algebraic) Hessian eigenvalues by Lanczos with full re-orthogonalisation on
    Hessian-vector products (forward-over-reverse), never forming H. Returns a (k,) float64 tensor,
    descending."""
    f, flat, _ = _flat_loss(model, loss_fn, batch)
    n = flat.numel()
    m = min(n, iters or max(2 * k + 20, 40))

    def hvp(v: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.func.jvp(torch.func.grad(f), (flat,), (v.to(flat.dtype),))[1].to(torch.float64)

    g = torch.Generator().manual_seed(seed)
    q = _unit(torch.randn(n, generator=g, dtype=torch.float64)).to(flat.device)
    Q = [q]
    alphas, betas = [], []
    for j in range(m):
        w = hvp(Q[j])
        alphas.append(float(Q[j] @ w))
        basis = torch.stack(Q, dim=1)
        for _ in range(2):  # full re-orthogonalisation, twice
            w = w - basis @ (basis.T @ w)
        beta = float(w.norm())
        if j == m - 1 or beta < 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        Q.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T).flip(0)[:k]


# --------------------------------------------------------------------------------------------------
# the dense operator of an optimizer


def update_operator(optimizer: torch.optim.Optimizer, H: Tensor, params: list[Tensor] | None = None) -> Tensor:
    """The linearised update operator J (SPEC 5) of ``optimizer`` around the current point for Hessian H
    (float64, over the optimizer's parameters flattened in order). SGD (with or without momentum; no
    dampening or Nesterov), Adam and AdamW (second moments frozen at their current values)."""
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    n = H.shape[0]
    I = torch.eye(n, dtype=torch.float64, device=H.device)
    groups = inner.param_groups
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    order = params if params is not None else [p for g in groups for p in g["params"]]
    eta = torch.cat([torch.full((p.numel(),), float(lrs[id(p)]), dtype=torch.float64) for p in order]).to(H.device)
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        pre = {id(p): (M, g) for p, M, g in _adam_preconditioners(inner)}
        M = torch.cat([pre[id(p)][0].reshape(-1) for p in order]).to(H.device)
        g0 = groups[0]
        b1 = g0["betas"][0]
        decoupled = isinstance(inner, torch.optim.AdamW) or g0.get("decoupled_weight_decay", False)
        wd = g0["weight_decay"]
        Hc = H + (wd * I if wd and not decoupled else 0)  # coupled L2 enters the gradient
        keep = (1 - eta * wd) if (wd and decoupled) else torch.ones_like(eta)
        EM = (eta * M)[:, None]
        if b1 == 0:
            return torch.diag(keep) - EM * Hc
        top = torch.cat([torch.diag(keep) - (1 - b1) * EM * Hc, -b1 * torch.diag(eta * M)], dim=1)
        bottom = torch.cat([(1 - b1) * Hc, b1 * I], dim=1)
        return torch.cat([top, bottom], dim=0)
    if isinstance(inner, torch.optim.SGD):
        g0 = groups[0]
        if g0["nesterov"] or g0["dampening"]:
            raise NotImplementedError("update_operator: SGD with Nesterov or dampening is not modelled")
        Hc = H + g0["weight_decay"] * I
        mu = g0["momentum"]
        if mu == 0:
            return I - eta[:, None] * Hc
        top = torch.cat([I - eta[:, None] * Hc, -mu * torch.diag(eta)], dim=1)
        bottom = torch.cat([Hc, mu * I], dim=1)
        return torch.cat([top, bottom], dim=0)
    raise TypeError(f"update_operator supports SGD, Adam and AdamW, got {type(inner).__name__}")


def kappa_of(J: Tensor, cluster_tol: float = 1e-8) -> KappaResult:
    """rho(J) and kappa(V) of a dense operator (float64 eig; eigenvectors with unit columns).

    Within an eigenspace of dimension > 1 (repeated eigenvalues: a Hessian's flat directions make many) any
    basis is a valid choice of eigenvectors and eig returns an arbitrary, possibly far from orthogonal one;
    each cluster of eigenvalues equal to ``cluster_tol`` (relative) gets an orthonormal basis of its
    eigenvectors' span instead, so a symmetric J has kappa 1."""
    lam, V = torch.linalg.eig(J.to(torch.float64))
    order = torch.argsort(lam.imag, stable=True)
    order = order[torch.argsort(lam.real[order], stable=True)]  # by real part, then imaginary part
    lam, V = lam[order], V[:, order]
    start = 0
    for i in range(1, len(lam) + 1):
        if i == len(lam) or abs(complex(lam[i] - lam[start])) > cluster_tol * max(1.0, abs(complex(lam[start]))):
            if i - start > 1:
                V[:, start:i] = torch.linalg.qr(V[:, start:i]).Q
            start = i
    V = V / torch.linalg.vector_norm(V, dim=0, keepdim=True)
    s = torch.linalg.svdvals(V)
    return KappaResult(rho=float(lam.abs().max()), kappa=float(s[0] / s[-1]) if s[-1] > 0 else math.inf)


def kappa_dense(model: nn.Module, loss_fn: Callable, batch, optimizer: torch.optim.Optimizer) -> KappaResult:
    """rho(J) and kappa(V) for a small network: the full Hessian and a dense eig in float64 (SPEC 5)."""
    H = hessian(model, loss_fn, batch)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return kappa_of(update_operator(optimizer, H, params))


# --------------------------------------------------------------------------------------------------
# the monitor


@dataclass
class MonitorRecord:
    step: int
    rho: float
    kappa: float
    eps: float
    warn: bool
    loss: float = float("nan")


def default_loss(forward, batch):
    """Cross-entropy of ``forward(batch[0])`` against ``batch[1]``."""
    x, y = batch
    return nn.functional.cross_entropy(forward(x), y)


class InstabilityMonitor:
    """Computes rho(J), kappa(V) and the warning rule rho(J) + eps kappa(V) >= 1 every ``every`` calls of
    :meth:`step` (after the optimizer's step), keeps a history and warns once per episode (a run of
    consecutive evaluations where the rule holds).

    Methods: ``"dense"`` (full Hessian and eig; exact, small networks: the default up to ``dense_limit``
    parameters), ``"lanczos"`` (momentum SGD in closed form from the top ``k`` Hessian eigenvalues; Adam:
    the sqrt(max M / min M) bound for kappa and rho from M-preconditioned eigenvalues of the b1 = 0 operator).
    ``eps``: a fixed perturbation size, or None to use the step-to-step change of J (its spectral norm for
    dense, eta |delta lambda_max| for Lanczos).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, every: int = 10, *,
                 loss_fn: Callable = default_loss, method: str = "auto", eps: float | None = None, k: int = 8,
                 dense_limit: int = 4000):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if method == "auto":
            method = "dense" if n <= dense_limit else "lanczos"
        if method not in ("dense", "lanczos"):
            raise ValueError(f"method must be 'auto', 'dense' or 'lanczos', got {method!r}")
        self.optimizer, self.model, self.every, self.loss_fn = optimizer, model, every, loss_fn
        self.method, self.eps, self.k = method, eps, k
        self.calls = 0
        self.history: list[MonitorRecord] = []
        self._prev = None
        self._in_episode = False

    def step(self, batch, loss: float | None = None) -> MonitorRecord | None:
        """Call once per training step; evaluates on schedule and returns the new record (else None)."""
        self.calls += 1
        if (self.calls - 1) % self.every:
            return None
        rho, kappa, prev = self._measure(batch)
        eps = self.eps if self.eps is not None else (0.0 if self._prev is None else prev)
        warn = rho + eps * kappa >= 1
        if warn and not self._in_episode:
            warnings.warn(f"InstabilityMonitor: rho(J) + eps kappa(V) = {rho:.4g} + {eps:.3g} x {kappa:.4g} >= 1 "
                          f"at step {self.calls}: transient amplification can destabilise training", RuntimeWarning,
                          stacklevel=2)
        self._in_episode = warn
        rec = MonitorRecord(self.calls, rho, kappa, eps, warn, float("nan") if loss is None else float(loss))
        self.history.append(rec)
        return rec

    def _measure(self, batch):
        params = [p for _, p in self.model.named_parameters() if p.requires_grad]
        if self.method == "dense":
            J = update_operator(self.optimizer, hessian(self.model, self.loss_fn, batch), params)
            res = kappa_of(J)
            change = float(torch.linalg.matrix_norm(J - self._prev, ord=2)) if self._prev is not None else 0.0
            self._prev = J
            return res.rho, res.kappa, change
        top = top_hessian_eigenvalues(self.model, self.loss_fn, batch, self.k)
        inner = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        lr = inner.param_groups[0]["lr"]
        if isinstance(inner, torch.optim.SGD):
            res = kappa_momentum(top, lr, inner.param_groups[0]["momentum"])
            rho, kappa = res.rho, res.kappa
        else:
            kappa = kappa_adam_bound(inner)
            mmax = max(float(M.max()) for _, M, _ in _adam_preconditioners(inner))
            rho = float(max(abs(1 - lr * mmax * top[0]), abs(1 - lr * mmax * top[-1])))
        change = lr * abs(float(top[0]) - self._prev) if self._prev is not None else 0.0
        self._prev = float(top[0])
        return rho, kappa, change
