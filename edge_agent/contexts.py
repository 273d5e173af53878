"""Per-context support sets and adapted states, at most `limits.max_contexts` of them.

Context names come from the line (the `context` topic and a sample's `context` field), so any
publisher can make up new ones; each costs K feature vectors and a state. Beyond the bound the least
recently used context is evicted: from memory, and so from the next snapshot. Its journal records go
with the next compaction; replaying them before that rebuilds the same LRU order, because recency is
only ever changed by state records ("s", "l", "a", "c" through `AgentState.apply`), never by a read.

Policy for an evicted context (docs/edge_agent.md): it is forgotten. If the line comes back to it,
it starts again from the meta-initialisation and re-adapts on its next labels, like a new context.
Not kept in a bounded on-disk store: a second store would need its own bound, its own compaction
and its own crash story, for contexts that by definition have not been used in the longest time;
a line with more live recipes than the bound should raise the bound (each context costs about
K x features x 40 bytes in memory and twice that in the snapshot), not page contexts to disk. The
current context is never evicted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class ContextState:
    k: int
    support: deque = field(default_factory=deque)  # (sample id, x float32[F], y), newest last
    state: np.ndarray | None = None  # adapted state; None -> meta-initialisation
    adapted_on: int = 0  # support size the current state was adapted on
    since_adapt: int = 0  # labels joined since the last adaptation
    n_labels: int = 0
    # Replay only: the support set as it was at an adaptation journaled without its state (state.py,
    # Derived); the agent re-derives the state from it before serving.
    replay_support: list | None = None

    def __post_init__(self):
        self.support = deque(self.support, maxlen=self.k)

    def support_arrays(self, support=None, y_dtype=None) -> tuple[np.ndarray, np.ndarray]:
        """(xs [n, *F] float32, ys [n]) oldest first: what the adapt graph takes. np.array rather than
        np.stack: the same array for equal-shape vectors at a fifth of the cost, paid per label; ys
        built as `y_dtype` (the graph's) rather than converted after."""
        sup = self.support if support is None else support
        return np.array([x for _, x, _ in sup]), np.array([y for _, _, y in sup], y_dtype)


class Contexts(OrderedDict):
    """name -> ContextState in least recently used order (oldest first). Plain reads (`get`, `[]`,
    iteration) do not count as use; `use` and `create` do."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.evicted = 0  # since start, for the log

    def use(self, name: str) -> ContextState | None:
        c = self.get(name)
        if c is not None:
            self.move_to_end(name)
        return c

    def create(self, name: str, k: int, current: str) -> ContextState:
        c = self[name] = ContextState(k)
        self.evict(current)
        return c

    def evict(self, current: str) -> None:
        """Down to the limit, oldest first, never `current` (a smaller limit after a reload applies here)."""
        while len(self) > self.limit:
            name = next(iter(self))
            if name == current:
                if len(self) == 1:
                    return
                self.move_to_end(name)  # the current context counts as the most recently used
                continue
            del self[name]
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 1000 == 0:
                log.warning("limits.max_contexts (%d) reached: least recently used context %r forgotten "
                            "(%d so far); it starts from the meta-initialisation if it comes back",
                            self.limit, name, self.evicted)
