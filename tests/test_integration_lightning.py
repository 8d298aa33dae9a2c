"""Every optimizer of the library returned by a LightningModule's ``configure_optimizers`` (automatic
optimisation: Lightning calls ``optimizer.step(closure)`` with a closure that runs the forward and the
backward): fit 12 steps with a checkpoint at step 6, resume in a fresh Trainer, bit-identical parameters."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning.pytorch")

from stabkernels.optim import PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam  # noqa: E402

OPTIMIZERS = {
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-2),
    "PSS(AdamW)": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-2), m),
    "OrthoGrad(AdamW)": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-2)),
    "RadiusController(Adam)": lambda m: RadiusController(torch.optim.Adam(m.parameters(), lr=1e-2), m),
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=0.1, model=m),
    "SAdam": lambda m: SAdam(m, lr=1e-2),
}


class Classifier(L.LightningModule):
    """An MLP classifier whose forward, given labels, returns {"loss", "logits"} (what S-Adam re-runs and the
    radius probe reads its logits from)."""

    def __init__(self, make_opt):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
        self.make_opt = make_opt

    def forward(self, x, y):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def training_step(self, batch, batch_idx):
        return self(*batch)["loss"]

    def configure_optimizers(self):
        return self.make_opt(self)


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 12, generator=g), torch.randint(0, 4, (96,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # 6 steps an epoch


def fit(make_opt, root, ckpt_path=None):
    model = Classifier(make_opt)
    every6 = L.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=6, save_top_k=-1,
                                         filename="{step}")
    trainer = L.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[every6], default_root_dir=root)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lightning_fits_and_resumes_bit_identically(name, tmp_path):
    full = fit(OPTIMIZERS[name], tmp_path / "full")
    assert all(torch.isfinite(p).all() for p in full)
    assert any(not torch.equal(a, b) for a, b in zip(full, Classifier(None).parameters()))  # it trained
    resumed = fit(OPTIMIZERS[name], tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "step=6.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
