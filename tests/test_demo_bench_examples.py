"""The user-facing commands, run small: `demo --quick`, `bench --quick`, and every example script."""
import csv
import importlib
import importlib.util
import os

import pytest

from stabkernels.__main__ import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_demo_quick_writes_sane_outputs(tmp_path, capsys):
    assert cli(["demo", "--quick", "--no-info", "--out", str(tmp_path)]) == 0
    for name in ("summary.csv", "summary.md", "history.csv", "accuracy_loss.png", "radius.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == 7 and {r["base_lr"] for r in rows} == {"0.01"}
    assert all(0.0 <= float(r["median_acc"]) <= 1.0 for r in rows)
    history = read_csv(tmp_path / "history.csv")
    assert len(history) == 7 * 200
    assert "RadiusAdamW" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_quick_writes_csv_table_and_chart(tmp_path):
    assert cli(["bench", "--quick", "--out", str(tmp_path)]) == 0
    stems = {p.rsplit(".", 1)[0] for p in os.listdir(tmp_path)}
    assert len(stems) == 1
    stem = tmp_path / stems.pop()
    for ext in (".csv", ".md", ".png"):
        assert stem.with_suffix(ext).stat().st_size > 0
    rows = read_csv(stem.with_suffix(".csv"))
    ops = {r["op"] for r in rows}
    for op in ("row_spread", "power_iteration_", "tangent_spread_linear", "directional_dots",
               "cross_entropy_z_loss_fwd_bwd"):
        assert op in ops
    assert all(float(r["speedup"]) > 0 and float(r["time_ms"]) > 0 for r in rows)


@pytest.mark.slow
def test_distributed_bench_times_every_optimizer_under_ddp_and_fsdp2(tmp_path):
    from stabkernels.benchmarks import distributed_steps

    assert distributed_steps.main(["--rounds", "1", "--width", "16", "--batch", "8", "--out", str(tmp_path),
                                   "--name", "smoke"]) == 0
    rows = read_csv(tmp_path / "smoke-distributed.csv")
    assert {(r["wrapper"], r["optimizer"]) for r in rows} == {
        (w, o) for w in ("DDP", "FSDP2") for o in ("AdamW(fused=True)", "RadiusController(Adam)", "RadiusAdamW",
                                                     "RadiusSGD", "SAdam", "PSSAdamW", "PSS(AdamW)", "OrthoGrad(AdamW)")}
    assert all(float(r["step_ms"]) > 0 for r in rows)
    assert "| SAdam |" in (tmp_path / "smoke-distributed.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_radius", "train_pss", "train_sadam", "train_orthograd"])
def test_example_resumes_identically(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(REPO, "examples"))
    module = importlib.import_module(script)
    assert module.main(steps=30) == 0
    assert "resumed run identical: True" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("script,optimizer", [("hf_trainer", "RadiusAdamW"), ("hf_trainer", "SAdam"),
                                              ("lightning", "SAdam"), ("lightning", "RadiusAdamW")])
def test_integration_example_resumes_identically(script, optimizer, capsys):
    # loaded by path: a module named lightning on sys.path would shadow the lightning package
    spec = importlib.util.spec_from_file_location(f"example_{script}", os.path.join(REPO, "examples", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(optimizer, steps=8) == 0
    assert "resumed run identical: True" in capsys.readouterr().out


def test_bench_compile_column_and_best_peer():
    import torch

    from stabkernels.benchmarks.cases import Case
    from stabkernels.benchmarks.run import COMPILED, run_case

    x = torch.randn(64, 300)
    case = Case(op="row_spread", shape="64x300", dtype="float32", nbytes=x.numel() * 4,
                baseline=lambda: (x.amax(1) - x.amin(1)).max(),
                candidates={"torch-again": lambda: (x.amax(1) - x.amin(1)).max()})
    rows = {r["backend"]: r for r in run_case(case, "cpu", 0.01, compile_baseline=True, copy_gbps=10.0)}
    assert set(rows) == {"torch-baseline", "torch-again", COMPILED}
    best = min(rows["torch-baseline"]["time_ms"], rows[COMPILED]["time_ms"])
    # vs_best_peer: best peer time / this time, for every row; peers are the baseline and its compiled form.
    # It is computed from unrounded times, the check from time_ms (rounded to 1e-4 ms, half a unit each way)
    # and itself rounded to 1e-3: the bound below is what those roundings allow, no more.
    half = 0.5e-4
    for r in rows.values():
        ratio = best / r["time_ms"]
        allowed = ratio * (half / best + half / r["time_ms"]) * 1.01 + 0.5e-3
        assert abs(r["vs_best_peer"] - ratio) <= allowed
        assert r["pct_of_copy"] == round(100 * r["GB_per_s"] / 10.0, 1) or abs(
            r["pct_of_copy"] - 100 * r["GB_per_s"] / 10.0) < 0.2


def test_machine_name_tells_a_bare_cpu_model_by_family_and_model():
    from stabkernels.benchmarks.run import cpu_label

    bare = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    assert cpu_label(bare) == "AMD EPYC-f25-m17"
    named = "cpu family\t: 6\nmodel\t\t: 106\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.60GHz\n"
    assert cpu_label(named) == "Intel(R) Xeon(R) Processor @ 2.60GHz"
    assert cpu_label("processor\t: 0\n") is None
