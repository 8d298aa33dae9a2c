"""Every optimizer of the library under Hugging Face ``Trainer``, constructed as a user first would (defaults,
plus the model where the class needs one), on tiny GPT-2 (dropout on) and LLaMA models built from configs and
synthetic tokens (nothing downloaded): 12 steps with a checkpoint at step 6, then a fresh Trainer resumes from
that checkpoint; the final parameters must be bit-identical to the uninterrupted run's."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from stabkernels.optim import PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam  # noqa: E402

VOCAB, SEQ = 61, 16


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
        return transformers.GPT2LMHeadModel(config)  # resid/embd/attn dropout 0.1: dropout is on
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config)


def token_dataset(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


OPTIMIZERS = {
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-3),
    "PSS(AdamW)": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-3), m),
    "OrthoGrad(AdamW)": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-3)),
    "RadiusController(AdamW)": lambda m: RadiusController(torch.optim.AdamW(m.parameters(), lr=1e-3), m),
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=1e-3, model=m),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=1e-2, model=m),
    "RadiusAdamW(head=lm_head)": lambda m: RadiusAdamW(m.parameters(), lr=1e-3, model=m, head=m.lm_head),
    "SAdam": lambda m: SAdam(m, lr=1e-3),
}


def train(kind, make_opt, out_dir, resume_from=None, **extra):
    model = tiny_model(kind)
    opt = make_opt(model)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=extra.pop("max_steps", 12), save_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], use_cpu=True, seed=0, data_seed=0, logging_steps=100,
        disable_tqdm=True, dataloader_num_workers=0, **extra)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_dataset(), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume_from)
    train.last_optimizer = opt
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trainer_trains_and_resumes_bit_identically(name, kind, tmp_path):
    make = OPTIMIZERS[name]
    full = train(kind, make, tmp_path / "full")
    assert all(torch.isfinite(p).all() for p in full)
    start = tiny_model(kind)
    assert any(not torch.equal(a, b) for a, b in zip(full, start.parameters()))  # it trained
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert os.path.isdir(checkpoint)
    resumed = train(kind, make, tmp_path / "resumed", resume_from=str(checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RadiusAdamW", "RadiusController(AdamW)", "SAdam"])
def test_probes_under_bf16_autocast(name, tmp_path):
    """Trainer(bf16=True) on CPU runs the training forward under bf16 autocast; the probes (JVP, the captured
    forward re-run) must still give a finite radius / slopes and finite parameters."""
    params = train("gpt2", OPTIMIZERS[name], tmp_path, max_steps=4, bf16=True)
    assert all(torch.isfinite(p).all() for p in params)
    last = train.last_optimizer.last
    if name == "SAdam":
        assert torch.isfinite(last.rho[0]) and torch.isfinite(last.D[0]).all()
    else:
        assert torch.isfinite(last.rho) and float(last.rho) > 0
