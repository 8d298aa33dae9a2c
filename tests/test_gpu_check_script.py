"""bench/gpu_check.sh (make gpu-check): its part limits fit the GPU window and match docs/gpu.md, and without a
GPU it prints one line and exits 0."""
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")
WINDOW_S = 480  # what a ~10 minute GPU window leaves after the machine starts


def limits():
    text = open(SCRIPT).read()
    parts = dict(kv.split("=") for kv in re.search(r'^PART_LIMITS="([^"]+)"', text, re.M).group(1).split())
    kill_after = int(re.search(r"^KILL_AFTER=(\d+)", text, re.M).group(1))
    return {k: int(v) for k, v in parts.items()}, kill_after


def test_part_limits_fit_the_window_with_margin():
    parts, kill_after = limits()
    assert set(parts) == {"build", "info", "tests", "bench", "compiled-steps"}
    worst = sum(parts.values()) + kill_after * len(parts)
    assert worst <= WINDOW_S - 10, (parts, worst)
    text = open(SCRIPT).read()
    for name in parts:  # every part runs under its limit
        assert re.search(rf"^part {re.escape(name)} ", text, re.M), name


def test_docs_list_the_part_limits():
    page = open(os.path.join(REPO, "docs", "gpu.md")).read()
    section = page[page.index("## Verify on your GPU"):]
    if "\n## " in section[5:]:
        section = section[:section.index("\n## ", 5)]
    parts, kill_after = limits()
    for name, seconds in parts.items():
        assert re.search(rf"^\| {re.escape(name)} \| {seconds} \|", section, re.M), name
    assert f"{sum(parts.values())} in all" in section
    assert f"{sum(parts.values()) + kill_after * len(parts)} s" in section


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: make gpu-check would run")
def test_without_a_gpu_one_line_and_exit_0(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT], env=dict(os.environ, PYTHON=sys.executable, OUT=str(out)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert (r.stdout + r.stderr).strip().splitlines() == ["gpu-check: no CUDA device (or no torch for "
                                                          f"{sys.executable}), nothing to do"]
    assert not out.exists()
