"""The paper-proxy scripts (bench/proxies/), run short: each writes its table with every row it promises."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(f"proxy_{name}", os.path.join(REPO, "bench", "proxies", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(path):
    return [line for line in path.read_text().splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]


@pytest.mark.slow
@pytest.mark.parametrize("name,rows,must", [
    ("grokking", 4, ["softmax CE | AdamW", "stablemax CE | OrthoGrad(AdamW)"]),
    ("sadam_qat", 2, ["| 0.001 |", "| 0.01 |"]),
    ("pss_deep", 3, ["| AdamW |", "| PSS(AdamW) |", "| PSS(AdamW, every=10) |"]),
    ("radius_normal", 2, ["| 0.001 |", "| 0.003 |"]),
])
def test_proxy_writes_its_table(name, rows, must, tmp_path):
    out = tmp_path / f"{name}.md"
    assert load(name).main(["--quick", "--out", str(out)]) == 0
    lines = table_rows(out)
    assert len(lines) == rows, lines
    for text in must:
        assert any(text in line for line in lines), (text, lines)


@pytest.mark.slow
@pytest.mark.parametrize("name,rows,must", [
    ("sadam_qat", 1, ["| 0.001 |"]),
    ("pss_deep", 3, ["| AdamW |", "| AdamW+clip(1.0) |", "| PSS(AdamW) |"]),
])
def test_proxy_paper_mode_writes_its_table(name, rows, must, tmp_path):
    """``--paper --quick``: the paper-like setting for a few steps (a smoke run), its own table."""
    out = tmp_path / f"{name}_paper.md"
    assert load(name).main(["--paper", "--quick", "--out", str(out)]) == 0
    lines = table_rows(out)
    assert len(lines) == rows, lines
    for text in must:
        assert any(text in line for line in lines), (text, lines)


def test_sadam_paper_network_is_the_authors_qatnet_with_a_four_level_quantiser():
    import torch

    m = load("sadam_qat")
    q = m.authors_quant(torch.randn(7, 30))
    assert len(torch.unique(q)) <= 4  # clamp(-2, 1): four levels, 2 bits
    x = m.paper_images(torch.rand(5, 64))
    assert x.shape == (5, 1, 32, 32)
    net = m.QATNet()
    assert net.fc1.in_features == 32 * 6 * 6 and net(x).shape == (5, 10)


def test_grokking_data_is_the_full_table_split_and_the_quantiser_has_four_levels():
    import torch

    g = load("grokking")
    xtr, ytr, xte, yte = g.data(0)
    assert len(xtr) + len(xte) == g.P ** 2 and len(xtr) == int(0.4 * g.P ** 2)
    assert torch.equal((xtr[:, 0] + xtr[:, 1]) % g.P, ytr)
    q = load("sadam_qat").fake_quant(torch.randn(5, 40))
    assert all(len(torch.unique(row)) <= 4 for row in q)
