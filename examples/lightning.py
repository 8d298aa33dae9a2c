"""Any stabkernels optimizer returned by a LightningModule's ``configure_optimizers`` (automatic optimisation:
Lightning calls ``optimizer.step(closure)``, the closure running forward and backward), on scikit-learn's
digits, with a checkpoint and a resume.

    python examples/lightning.py [--optimizer SAdam|RadiusAdamW|PSSAdamW|...] [--steps 40]

The module's forward, given labels, returns {"loss", "logits"}: S-Adam re-runs that captured forward for its
probe losses, the radius controllers read the logits from it.
"""
import argparse
import os
import sys
import tempfile

# Run as a script, this file's folder comes first on sys.path and its name would shadow the lightning package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
if getattr(sys.modules.get("lightning"), "__file__", None) == os.path.abspath(__file__):
    del sys.modules["lightning"]

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from stabkernels.optim import PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam  # noqa: E402

OPTIMIZERS = {
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=1e-2, model=m),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=0.1, momentum=0.9, model=m),
    "RadiusController": lambda m: RadiusController(torch.optim.Adam(m.parameters(), lr=1e-2), m),
    "SAdam": lambda m: SAdam(m, lr=1e-2),
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-2),
    "PSS": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-2), m),
    "OrthoGrad": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-2)),
}


class DigitsClassifier(L.LightningModule):
    def __init__(self, optimizer: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 10))
        self.optimizer = optimizer

    def forward(self, x, y):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def training_step(self, batch, batch_idx):
        return self(*batch)["loss"]

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self)


def digits_loader(batches: int):
    """``batches`` batches of 64 digits an epoch. The checkpoint below falls on an epoch boundary: resumed
    mid-epoch, Lightning restarts a plain DataLoader's epoch, and the resumed run would see other batches."""
    x, y = load_digits(return_X_y=True)
    n = min(len(y), 64 * batches)
    data = torch.utils.data.TensorDataset(torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n]))
    return torch.utils.data.DataLoader(data, batch_size=64)


def fit(optimizer: str, steps: int, root: str, ckpt_path=None):
    model = DigitsClassifier(optimizer)
    half = L.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=steps // 2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[half], default_root_dir=root)
    trainer.fit(model, digits_loader(steps // 2), ckpt_path=ckpt_path)
    x, y = digits_loader(steps // 2).dataset.tensors
    with torch.no_grad():
        accuracy = (model.net(x).argmax(1) == y).float().mean().item()
    return accuracy, [p.detach().clone() for p in model.parameters()]


def main(optimizer: str = "SAdam", steps: int = 40) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        accuracy, full = fit(optimizer, steps, os.path.join(tmp, "full"))
        _, resumed = fit(optimizer, steps, os.path.join(tmp, "resumed"),
                         ckpt_path=os.path.join(tmp, "full", f"step={steps // 2}.ckpt"))
    same = all(torch.equal(a, b) for a, b in zip(full, resumed))
    print(f"{optimizer}: training accuracy {accuracy:.3f} after {steps} steps; resumed run identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="SAdam", choices=sorted(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    sys.exit(main(a.optimizer, a.steps))
