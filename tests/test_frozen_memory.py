"""A stopped problem's curvature pairs are kept by rotation in the sync-free driver
(``soo_func.drivers.frozen``): the rotation is exact (the unit test against the memory
before the frozen step), and the state a sync-free run returns equals the state of the run
that stopped at the problem's last step, alone and in a batch whose members stop at
different steps."""

from __future__ import annotations

import optree
import pytest
import torch
from torch._dynamo.utils import counters

import soo_func as sf
from soo_func.directions import pair_memory
from soo_func.drivers import compiled_step
from soo_func.drivers.frozen import freeze_state, no_rotations, thaw

F64 = torch.float64
N = 20_000  # with m = 4: 2 m n > STACK_ALWAYS_ELEMENTS and n > STACK_MAX_SLOT, the tuple layout


def tensors(state) -> list[torch.Tensor]:
    return [x for x in optree.tree_leaves(state) if isinstance(x, torch.Tensor)]


def assert_same_state(a, b, **tol) -> None:
    left, right = tensors(a), tensors(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        torch.testing.assert_close(x, y, **(tol or {"rtol": 0, "atol": 0}))


def pushed_memories(m: int, n: int, pushes: int, seed: int = 0):
    """The memories after each of ``pushes`` pushes of random points (all pairs accepted)."""
    gen = torch.Generator().manual_seed(seed)
    memory = pair_memory.init_memory(m, n, F64, torch.device("cpu"))
    last = pair_memory.init_last_point(m, n, F64, torch.device("cpu"))
    out = [memory]
    for _ in range(pushes):
        point = torch.randn(2, n, generator=gen, dtype=F64)
        pushed = pair_memory.push(out[-1], last, point, lambda gram, valid: torch.tensor(True))
        out.append(pushed.memory)
        last = pushed.last
    return out


@pytest.mark.parametrize("n", [N, 4])  # the tuple layout (rotated), the stacked one (selected)
def test_frozen_pushes_rotate_and_thaw_restores_the_memory(n):
    m = 4
    memories = pushed_memories(m, n, pushes=m + 3)
    kept = memories[m + 1]
    tuple_layout = isinstance(kept.pairs, tuple)
    assert tuple_layout == (n == N)
    stay, go = torch.tensor(False), torch.tensor(True)
    rotations = no_rotations(kept, like=stay)
    state, frozen = kept, []
    for _ in range(3):  # three frozen steps: each pushes, the freeze keeps the old memory
        new = pair_memory.push(
            state,
            pair_memory.init_last_point(m, n, F64, torch.device("cpu")),
            torch.ones(2, n, dtype=F64),
            lambda gram, valid: torch.tensor(True),
        ).memory
        state, rotations = freeze_state(stay, new, state, rotations)
        frozen.append(state)
    assert int(rotations[0]) == (3 if tuple_layout else 0)
    if tuple_layout:  # really rotated: slot 0 now holds what slot 3 (mod m) held
        torch.testing.assert_close(frozen[-1].pairs[0], kept.pairs[3], rtol=0, atol=0)
    assert_same_state(thaw(state, rotations), kept)
    on_host = thaw(state, tuple(int(r) for r in rotations))  # counts read after a compiled run
    assert_same_state(on_host, kept)
    if tuple_layout:  # reordered, not copied
        assert {id(v) for v in optree.tree_leaves(on_host.pairs)} == {
            id(v) for v in optree.tree_leaves(state.pairs)
        }
    moved, turned = freeze_state(go, memories[m + 2], kept, no_rotations(kept, like=go))
    assert int(turned[0]) == 0
    assert_same_state(moved, memories[m + 2])
    if tuple_layout:  # the moving memory's slots are the pushed ones, not copies
        assert all(a is b for a, b in zip(moved.pairs[:-1], kept.pairs[1:], strict=True))


def quadratic(scale: float):
    curvature = torch.linspace(1.0, 10.0, N, dtype=F64) * scale

    def value(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (curvature * (x - 1.0) ** 2).sum()

    return value


def chain():
    return sf.chain(sf.lbfgs(4), sf.armijo_sync_free())


def test_a_stopped_run_returns_the_state_of_its_last_step():
    value = quadratic(1.0)
    x0 = torch.zeros(N, dtype=F64)
    free = sf.minimize(value, x0, chain(), max_steps=60, gtol=1e-6, check_every=None)
    stopped = sf.minimize(value, x0, chain(), max_steps=60, gtol=1e-6, check_every=1)
    steps = int(free.num_steps)
    assert bool(free.converged) and 4 < steps < 50  # frozen for many steps, more than m
    assert int(stopped.num_steps) == steps
    torch.testing.assert_close(free.params, stopped.params, rtol=0, atol=0)
    assert_same_state(free.state, stopped.state)


@pytest.mark.parametrize("compact_every", [None, 8])  # lockstep to the end; compacted
def test_batch_members_stopping_at_different_steps_return_their_own_states(compact_every):
    scales = (1.0, 3.0, 0.05)  # the last one's gradients are small: it stops much later
    x0s = torch.zeros(3, N, dtype=F64)
    curvature = torch.stack([torch.linspace(1.0, 10.0, N, dtype=F64) * s for s in scales])

    def value(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return 0.5 * (c * (x - 1.0) ** 2).sum()

    batched = sf.batched_minimize(
        value, x0s, chain(), args=(curvature,), max_steps=60, gtol=1e-6, compact_every=compact_every
    )
    steps = batched.num_steps.tolist()
    assert len(set(steps)) == 3 and max(steps) < 60, steps
    for i, scale in enumerate(scales):
        alone = sf.minimize(quadratic(scale), x0s[i], chain(), max_steps=60, gtol=1e-6)
        assert alone.num_steps == steps[i]
        member = optree.tree_map(lambda x, i=i: x[i], batched.state)
        assert_same_state(member, alone.state, rtol=1e-9, atol=1e-12)


def test_a_compiled_run_keeps_one_graph_and_the_eager_state(monkeypatch):
    """Traced, the shift is recognised too (the result equals eager's, thawed), and the step
    keeps one graph: no slot shares a tensor with another (aliased inputs would recompile
    the step at each of the first pushes). Dynamo's tracing and guards with the eager
    backend: the graph, not inductor's code, is what this checks."""
    monkeypatch.setattr(compiled_step, "blas_inductor", "eager")
    value, x0 = quadratic(1.0), torch.zeros(N, dtype=F64)
    eager = sf.minimize(value, x0, chain(), max_steps=40, gtol=1e-6, check_every=None)
    torch.compiler.reset()
    counters.clear()
    try:
        compiled = sf.minimize(
            value, x0, chain(), max_steps=40, gtol=1e-6, check_every=None, compile=True
        )
        graphs, recompiles = counters["stats"]["unique_graphs"], dict(counters["recompiles"])
    finally:
        torch.compiler.reset()
    assert graphs == 1 and not recompiles
    assert int(compiled.num_steps) == int(eager.num_steps) < 30  # frozen steps ran, compiled
    torch.testing.assert_close(compiled.params, eager.params, rtol=0, atol=1e-12)
    lbfgs_state = 0  # the chain's first member
    assert_same_state(
        compiled.state.states[lbfgs_state], eager.state.states[lbfgs_state], rtol=1e-9, atol=1e-12
    )
