"""Any stabkernels optimizer under Hugging Face ``Trainer``: a tiny GPT-2 built from a config, trained on the
bytes of a Python standard-library source file (nothing downloaded), with a checkpoint and a resume.

    python examples/hf_trainer.py [--optimizer RadiusAdamW|SAdam|PSSAdamW|...] [--steps 40]

What each optimizer needs: RadiusAdamW / RadiusSGD / RadiusController and SAdam take the model (they capture
the inputs of each training forward with a forward pre-hook, so Trainer's plain ``optimizer.step()`` works);
PSS / PSSAdamW take the model to skip embeddings; OrthoGrad wraps any optimizer.
"""
import argparse
import inspect
import os
import sys
import tempfile

import torch
import transformers

from stabkernels.optim import PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam

OPTIMIZERS = {
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=1e-3, weight_decay=0.1, model=m, head=m.lm_head),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=0.1, momentum=0.9, model=m),
    "RadiusController": lambda m: RadiusController(torch.optim.AdamW(m.parameters(), lr=1e-3), m),
    "SAdam": lambda m: SAdam(m, lr=1e-3),               # probe losses: the captured forward's .loss
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-3, weight_decay=0.1),
    "PSS": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-3), m),
    "OrthoGrad": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-3)),
}
SEQ = 32


def byte_blocks(n_blocks: int):
    """Blocks of SEQ bytes from the source of this Python's standard library (inspect.py)."""
    data = torch.tensor(list(open(inspect.__file__, "rb").read()), dtype=torch.long)
    blocks = data[: n_blocks * SEQ].view(n_blocks, SEQ)
    return [{"input_ids": b, "labels": b.clone()} for b in blocks]


def run(name: str, steps: int, out_dir: str, resume_from=None):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    opt = OPTIMIZERS[name](model)
    args = transformers.TrainingArguments(output_dir=out_dir, max_steps=steps, save_steps=steps // 2,
                                          per_device_train_batch_size=8, report_to=[], use_cpu=True, seed=0,
                                          logging_steps=max(1, steps // 4), disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=byte_blocks(8 * steps),
                                   optimizers=(opt, None))  # (optimizer, scheduler): Trainer adds a linear one
    result = trainer.train(resume_from_checkpoint=resume_from)
    return result.training_loss, [p.detach().clone() for p in model.parameters()]


def main(optimizer: str = "RadiusAdamW", steps: int = 40) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        loss, full = run(optimizer, steps, os.path.join(tmp, "full"))
        _, resumed = run(optimizer, steps, os.path.join(tmp, "resumed"),
                         resume_from=os.path.join(tmp, "full", f"checkpoint-{steps // 2}"))
    same = all(torch.equal(a, b) for a, b in zip(full, resumed))
    print(f"{optimizer}: mean training loss {loss:.3f} nats/byte over {steps} steps; resumed run identical: {same}")
    return 0 if same and loss == loss else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="RadiusAdamW", choices=sorted(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    sys.exit(main(a.optimizer, a.steps))
