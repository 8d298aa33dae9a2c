"""The LM scenario: its data (the standard library's sources, split by file, fixed budgets), its model, and
the demo run small, with the scenario's claim checked: the spike wrecks AdamW and not RadiusAdamW."""
import csv
import math

import pytest
import torch

from stabkernels.demo import lm
from stabkernels.__main__ import main as cli


def test_corpus_is_fixed_real_text_split_by_file():
    a, b = lm.load_corpus(4096, 1024), lm.load_corpus(4096, 1024)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.train) == 4096 and len(a.val) == 1024 and a.files > 20
    files = lm.stdlib_files()
    assert files == sorted(files)
    with open(files[0], "rb") as f:  # file 0 is training, file 7 the first validation file
        assert bytes(a.train[:64].tolist()) == f.read(64)
    with open(files[7], "rb") as f:
        assert bytes(a.val[:64].tolist()) == f.read(64)
    assert b"import" in bytes(a.train.tolist())


def test_model_is_causal_and_windows_shift_by_one():
    torch.manual_seed(0)
    model = lm.ByteLM(context=16)
    data = torch.arange(100, dtype=torch.uint8)
    x, y = lm.windows(data, torch.tensor([0, 50]), 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and x[1, 0] == 50
    out = model(x)
    assert out.shape == (2, 16, lm.VOCAB)
    x2 = x.clone()
    x2[:, 10] = 7  # a later byte never changes earlier logits
    assert torch.allclose(model(x2)[:, :10], out[:, :10])


@pytest.mark.slow
def test_lm_demo_quick_spike_wrecks_adamw_not_radius_adamw(tmp_path):
    assert cli(["demo", "--scenario", "lm", "--quick", "--no-info", "--out", str(tmp_path)]) == 0
    out = tmp_path / "lm"
    for name in ("summary.csv", "summary.md", "curves.csv", "val_loss.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "spike", "seed", "final_val_loss"]
    assert {r["method"] for r in rows} == set(lm.METHODS) and len(rows) == 2 * len(lm.METHODS)
    loss = {(r["method"], r["spike"]): float(r["final_val_loss"]) for r in rows}
    assert all(math.isfinite(loss[(m, "false")]) and loss[(m, "false")] < math.log(256) for m in lm.METHODS)
    adamw = loss[("AdamW", "false")]
    assert not loss[("AdamW", "true")] < 1.5 * adamw  # diverged (inf/nan) or at least 1.5x worse
    assert loss[("RadiusAdamW", "true")] <= 1.1 * adamw


def test_lr_sensitivity_is_wortsmans_metric():
    from stabkernels.demo import lr_sweep

    # mean over the grid of min(L, L0) - min L: (2 + 3 + 5 + 5) / 4 - 2, a diverged run counting as L0 = 5
    assert lr_sweep.sensitivity({1e-3: 3.0, 1e-2: 2.0, 1e-1: 7.0, 1.0: math.inf}, 5.0) == pytest.approx(1.75)
    assert lr_sweep.sensitivity({1e-3: 2.0, 1e-2: 2.0}, 5.0) == 0.0
    assert len(lr_sweep.GRID) >= 7 and lr_sweep.GRID[-1] / lr_sweep.GRID[0] >= 1e3 - 1e-6


def test_lr_sweep_runs_and_writes_its_outputs(tmp_path):
    from stabkernels.demo import lr_sweep

    md = lr_sweep.run(str(tmp_path), seeds=1, steps=4, widths=(16,), grid=(1e-3, 1.0),
                      methods=["AdamW", "RadiusAdamW (default)"], workers=1)
    for name in ("summary.csv", "summary.md", "lr_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"AdamW", "RadiusAdamW (default)"}
    assert all(float(r["init_val_loss"]) == pytest.approx(math.log(256), rel=0.1) for r in rows)
    assert "| AdamW |" in md and "| RadiusAdamW (default) |" in md


def test_run_with_qk_clip_bounds_the_attention_logits():
    """lm.run(qk_clip=tau): QKClip after every step. A threshold above every logit changes nothing (bit for bit);
    a low one holds the trained model's attention logits far below the unclipped run's."""
    import stabkernels as sk

    corpus = lm.load_corpus(8192, 2048)
    models = []

    def factory(model, lr):
        models.append(model)
        return lm.adamw(model, lr)

    kw = dict(spike=False, lr=1e-2, steps=12, eval_every=12, val_windows=8, d=32, factory=factory)
    plain = lm.run("AdamW", corpus, 0, **kw)
    high = lm.run("AdamW", corpus, 0, qk_clip=1e9, **kw)
    low = lm.run("AdamW", corpus, 0, qk_clip=1.0, **kw)
    assert plain.loss == high.loss and plain.val_loss == high.val_loss
    assert low.loss != plain.loss
    x, _ = lm.windows(corpus.val, torch.tensor([0, 500, 1000]), 64)

    def max_logit(model):  # of the first block, whose input the clip does not change
        b = model.blocks[0]
        q, k, _ = b.qkv(b.ln1(model.tok(x) + model.pos(torch.arange(64)))).view(3, 64, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return sk.qk_max_logits(q, k).max().item()

    assert max_logit(models[2]) < 0.5 * max_logit(models[0])
