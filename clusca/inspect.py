"""A read-only view of a transformer's ClusCa state, for tests, benchmarks and debugging.

    state = clusca.run_state(transformer)
    state.full, state.step                    # the current (last) call
    state.fresh_rows("transformer_blocks.0.ff")   # rows it recomputed on this cached step
    state.factors("transformer_blocks.0.attn")    # its Taylor factors, F_0 first
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .install import get_controller


@dataclass(frozen=True)
class ClusterView:
    assign: torch.Tensor  # (batch, tokens): each token's cluster
    k: int


class RunState:
    def __init__(self, controller) -> None:
        self._ctrl = controller
        self._slots = {s.name: s for s in controller.slots}

    @property
    def active(self) -> bool:
        return self._ctrl.active

    @property
    def step(self) -> int:
        """Step index of the current (or last) call in its denoising loop."""
        return self._ctrl.branch.step

    @property
    def full(self) -> bool:
        """Whether the current (or last) call is a full step."""
        return self._ctrl.branch.full

    @property
    def steps_since_full(self) -> int:
        branch = self._ctrl.branch
        return branch.step - branch.last_full if not branch.full else 0

    @property
    def lean_steps(self) -> int:
        """Cached calls of this run served by the architecture's lean cached step."""
        return self._ctrl.counters.lean_steps

    @property
    def module_names(self) -> list[str]:
        return list(self._slots)

    def role(self, name: str) -> str:
        return self._slot(name).role

    def clusters(self, group: str = "image") -> ClusterView | None:
        c = self._ctrl.branch.clusters.get(group)
        return ClusterView(c.assign, c.k) if c is not None else None

    def fresh_rows(self, name: str) -> torch.Tensor | None:
        """Rows (of the flattened ``(batch * tokens)`` layout) that feed-forward module ``name``
        recomputed on the current cached step, or ``None``."""
        slot = self._slot(name)
        branch = self._ctrl.branch
        picked = branch.fresh.get(slot.group) if slot.role == "feedforward" else None
        if picked is None or branch.full or picked[0] != branch.step:
            return None
        return picked[2][0][slot.group_pos]

    def group_fresh_rows(self, group: str = "image") -> torch.Tensor | None:
        """This cached step's fresh rows of every feed-forward module of ``group``: ``(layers, rows)``."""
        branch = self._ctrl.branch
        picked = branch.fresh.get(group)
        if picked is None or branch.full or picked[0] != branch.step:
            return None
        return picked[2][1]

    def factors(self, name: str, output: int = 0) -> tuple[torch.Tensor, ...]:
        """The valid Taylor factors of output ``output`` of module ``name`` (a block chain keeps
        its sum at its first block), ``F_0`` first; empty before its first full step."""
        st = self._ctrl.branch.slots[self._slot(name).index]
        if not st.factors or output >= len(st.factors):
            return ()
        return st.factors[output].views[: st.n]

    def _slot(self, name: str):
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"{name!r} is not hooked by ClusCa; hooked modules: {sorted(self._slots)}")
        return slot


def run_state(model: torch.nn.Module) -> RunState:
    """The ClusCa state of ``model`` (hooks must be installed)."""
    ctrl = get_controller(model)
    if ctrl is None:
        raise ValueError("run_state: ClusCa is not applied to this model (call apply_clusca first)")
    return RunState(ctrl)
