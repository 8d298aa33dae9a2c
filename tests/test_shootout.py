"""The stability shoot-out (demo --scenario shootout): its damage measure, every defense on every model it applies
to, and a small run of the scenario with its headline claims checked."""
import math
import os

import pytest
import torch

from stabkernels.demo import shootout


def test_damage_is_relative_to_undisturbed_adamw_in_the_right_direction():
    acc = {"task": "mlp", "outcome": 0.45}
    loss = {"task": "transformer", "outcome": 3.3}
    assert shootout.damage(acc, 0.9) == pytest.approx(0.5)  # half the accuracy lost
    assert shootout.damage({**acc, "outcome": 0.99}, 0.9) < 0  # better than the reference
    assert shootout.damage(loss, 3.0) == pytest.approx(0.1)
    assert shootout.damage({**loss, "outcome": math.inf}, 3.0) == math.inf
    assert shootout.damage({"task": "grokking", "outcome": 0.25}, 0.0) == 0.25  # the collapsed share itself


def test_attention_defenses_apply_to_the_transformer_only():
    todo = shootout.jobs(1, 10, 5)
    for failure, defense, _, _ in todo:
        if defense in ("AdamW+QK-LN", "QK-clip", "z-loss+QK-LN"):
            assert shootout.FAILURES[failure].task == "transformer"
    every = {(f, d) for f, d, _, _ in todo}
    assert ("attention-logit growth", "QK-clip") in every and ("corrupted batch", "SkipStep") in every
    assert len(todo) == len(set(todo))


@pytest.mark.parametrize("defense", list(shootout.DEFENSES))
def test_every_defense_trains_every_model_it_applies_to(defense):
    torch.manual_seed(0)
    for failure in ("none (MLP)", "none (transformer)", "softmax collapse"):
        if not shootout.DEFENSES[defense].applies(shootout.FAILURES[failure].task):
            continue
        r = shootout.run(failure, defense, 0, 6)
        assert math.isfinite(r["outcome"]) and r["step_ms"] > 0, r
        assert r["defense"] == defense and r["failure"] == failure


def test_the_shootout_shows_what_each_defense_is_for(tmp_path):
    """A sustained x1000 spike wrecks AdamW, not RadiusAdamW; a corrupted batch costs AdamW accuracy and SkipStep
    none of it (it skips that step)."""
    md = shootout.run_scenario(str(tmp_path), seeds=1, steps=140, grok_steps=4,
                               failures=["lr x1000, sustained", "corrupted batch"],
                               defenses=["AdamW", "RadiusAdamW", "SkipStep"])
    assert {"summary.md", "summary.csv", "heatmap.png"} <= set(os.listdir(tmp_path))
    with open(tmp_path / "summary.csv") as f:
        rows = f.read().splitlines()
    assert len(rows) == 1 + 2 * 3 + 2  # the two failures x three defenses, and the two references
    table = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                               for line in md.splitlines() if line.startswith("| "))}
    head = table["failure (model)"]
    assert sorted(head) == ["AdamW", "RadiusAdamW", "SkipStep"]

    def cell(row, defense):
        return float(table[row][head.index(defense)].rstrip("%"))

    spike, corrupt = "lr x1000, sustained (mlp)", "corrupted batch (mlp)"
    assert cell(spike, "AdamW") > 50 and cell(spike, "RadiusAdamW") < 10
    assert cell(corrupt, "AdamW") > cell(corrupt, "SkipStep") and cell(corrupt, "SkipStep") < 2
