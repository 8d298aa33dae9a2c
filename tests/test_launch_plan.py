"""Launch plans (stabkernels/_launch_plan.py): built once per tensor list, reused while the tensors' storage and
shapes are unchanged, rebuilt (never silently reused) when they change; and the Triton steps that use them give
the reference's numbers before and after such a change."""
import pytest
import torch

from stabkernels import _launch_plan as plan
from stabkernels import update
from stabkernels.backend import why_unavailable


@pytest.fixture(autouse=True)
def _fresh():
    plan.clear()
    yield
    plan.clear()


def tensors(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in shapes]


def test_layout_groups_chunks_and_is_reused():
    ts = tensors((5, 3), (0,), (9000,)) + tensors((7,), dtype=torch.float64)
    groups = plan.layout(ts, 4096)
    assert [g.dtype for g in groups] == [torch.float32, torch.float64]
    g = groups[0]
    assert g.members == (0, 1, 2) and g.index.tolist() == [0, 1, 2]
    assert g.numels.tolist() == [15, 0, 9000]
    # one program for each small or empty tensor, three for 9000 elements; consecutive per tensor
    assert g.chunk_tensor.tolist() == [0, 1, 2, 2, 2]
    assert g.chunk_start.tolist() == [0, 0, 0, 4096, 8192]
    assert g.first_chunk.tolist() == [0, 1, 2] and g.chunk_count.tolist() == [1, 1, 3]
    builds = plan.builds()
    assert plan.layout(ts, 4096) is groups  # same sizes: the same plan, nothing built
    assert plan.layout([t.clone() for t in ts], 4096) is groups  # layouts depend on sizes, not storage
    assert plan.builds() == builds


def test_stream_layout_with_offsets():
    (g,) = plan.layout(tensors((10,), (3,)), 2, unit=4, starts=[6, 0])
    # elements [6, 16) are counters 1..3 (ceil(16 / 4) = 4): programs start at counters 1, 3; [0, 3): counter 0
    assert g.chunk_tensor.tolist() == [0, 0, 1] and g.chunk_start.tolist() == [1, 3, 0]


def test_a_new_shape_or_storage_gets_a_new_table():
    ts = tensors((4, 4), (6,))
    (g,) = plan.layout(ts, 8)
    a = plan.addresses(ts, g)
    assert a.tolist() == [t.data_ptr() for t in ts]
    assert plan.addresses(ts, g) is a
    ts[1] = torch.randn(6)  # new storage, same shape
    b = plan.addresses(ts, g)
    assert b is not a and b.tolist() == [t.data_ptr() for t in ts]
    (g2,) = plan.layout([ts[0], torch.randn(7)], 8)  # new shape
    assert g2 is not g and g2.numels.tolist() == [16, 7]


def test_constants_cached_by_value():
    c = plan.constants((0.9, 0.999), torch.device("cpu"))
    assert c.dtype == torch.float64 and c.tolist() == [0.9, 0.999]
    assert plan.constants((0.9, 0.999), torch.device("cpu")) is c
    assert plan.constants((0.9, 0.99), torch.device("cpu")) is not c


def _adam_step(params, grads, ms, vs, step, backend):
    return update.adam_step_(params, grads, ms, vs, step=step, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                             backend=backend)


@pytest.mark.skipif(why_unavailable("triton", "cpu") is not None, reason="no Triton interpreter")
def test_triton_steps_follow_reallocated_and_reshaped_tensors():
    """Step, then move every tensor to new storage (as model.to() or a reallocated gradient would) and change
    one shape: the Triton step keeps matching the reference, and only the changed tables are rebuilt."""
    torch.manual_seed(0)
    shapes = [(33, 7), (5,), (300,)]
    base = [tensors(*shapes) for _ in range(4)]
    base[3] = [v.abs() for v in base[3]]  # exp_avg_sq >= 0
    state = {b: [[t.clone() for t in lst] for lst in base] for b in ("torch", "triton")}
    for step in (1, 2):
        for b, (p, g, m, v) in state.items():
            _adam_step(p, g, m, v, step, b)
    builds = plan.builds()
    for b, (p, g, m, v) in state.items():  # warm: nothing built
        _adam_step(p, g, m, v, 3, b)
    assert plan.builds() == builds
    for b in state:  # new storage for everything
        state[b] = [[t.clone() for t in lst] for lst in state[b]]
    for b, (p, g, m, v) in state.items():
        _adam_step(p, g, m, v, 4, b)
    assert plan.builds() > builds  # new address tables, not the stale ones
    for lst_t, lst_r in zip(state["triton"], state["torch"]):
        for a, r in zip(lst_t, lst_r):
            torch.testing.assert_close(a, r)
    for b in state:  # a new shape
        for lst in state[b]:
            lst[1] = torch.ones(9)
    for b, (p, g, m, v) in state.items():
        _adam_step(p, g, m, v, 5, b)
    for lst_t, lst_r in zip(state["triton"], state["torch"]):
        for a, r in zip(lst_t, lst_r):
            torch.testing.assert_close(a, r)
