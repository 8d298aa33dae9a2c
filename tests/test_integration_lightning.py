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
    radius probe reads its logits from); or, with kind="gpt2" / "llama", test_integration_hf's tiny Hugging
    Face models (GPT-2 with dropout on) whose output has .loss and .logits."""

    def __init__(self, make_opt, kind="mlp"):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        if kind in ("gpt2", "llama"):
            from .test_integration_hf import tiny_model

            self.net = tiny_model(kind)
        else:
            self.net = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
        self.make_opt = make_opt

    def forward(self, x, y):
        if self.kind != "mlp":
            return self.net(input_ids=x, labels=y)
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def training_step(self, batch, batch_idx):
        out = self(*batch)
        return out["loss"] if isinstance(out, dict) else out.loss

    def configure_optimizers(self):
        return self.make_opt(self)

    # Lightning does not checkpoint the global RNG (Hugging Face's Trainer does); GPT-2's dropout draws from it
    def on_save_checkpoint(self, checkpoint):
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint):
        torch.set_rng_state(checkpoint["torch_rng_state"])


VOCAB, SEQ = 61, 16  # test_integration_hf's (not imported at module level: the MLP cases need no transformers)


def loader(kind="mlp"):
    g = torch.Generator().manual_seed(0)
    if kind != "mlp":
        x = torch.randint(0, VOCAB, (24, SEQ), generator=g)
        data = torch.utils.data.TensorDataset(x, x.clone())
        return torch.utils.data.DataLoader(data, batch_size=4)  # 6 steps an epoch
    x, y = torch.randn(96, 12, generator=g), torch.randint(0, 4, (96,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # 6 steps an epoch


def fit(make_opt, root, ckpt_path=None, kind="mlp"):
    model = Classifier(make_opt, kind)
    every6 = L.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=6, save_top_k=-1,
                                         filename="{step}")
    trainer = L.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[every6], default_root_dir=root)
    trainer.fit(model, loader(kind), ckpt_path=ckpt_path)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "gpt2", "llama"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lightning_fits_and_resumes_bit_identically(name, kind, tmp_path):
    if kind != "mlp":
        pytest.importorskip("transformers")
    full = fit(OPTIMIZERS[name], tmp_path / "full", kind=kind)
    assert all(torch.isfinite(p).all() for p in full)
    assert any(not torch.equal(a, b) for a, b in zip(full, Classifier(None, kind).parameters()))  # it trained
    resumed = fit(OPTIMIZERS[name], tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "step=6.ckpt"), kind=kind)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
