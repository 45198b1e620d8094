"""Communication graphs over peers and their Metropolis-Hastings mixing weights.

Gossip averaging repeats ``x <- W x``: each peer replaces its parameters with a weighted
average of its own and its neighbours'. This module is the pure graph math behind that step
(numpy only, no torch, no I/O): it builds the undirected graph a config asks for (ring,
torus, exponential, full, star or an explicit edge list), validates it, and computes ``W``.

Why Metropolis-Hastings weights, ``w_ij = 1 / (1 + max(d_i, d_j))`` for each edge and
``w_ii = 1 - sum_j w_ij``: the result is symmetric and doubly stochastic on *any* undirected
graph, so gossip converges to the exact average rather than a degree-biased one, and each
peer needs only its own degree and its neighbours' degrees to compute its row. No peer ever
needs the whole matrix, and no coordinator hands rows out; under churn a peer recomputes its
row from the degrees its live neighbours report (``live_neighbor_degrees``). The trade-off
is speed: MH weights are not the fastest-mixing weights for a given graph (those need a
global semidefinite program), but they are within a small factor on the regular graphs used
here and exactly optimal for the full graph (``W = J / n``).

How fast gossip converges is governed by the second largest eigenvalue modulus ``λ2`` of
``W``: disagreement between peers shrinks by about ``λ2`` per round, so the spectral gap
``1 - λ2`` is what :func:`describe` reports next to the adjacency and the weights.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from p2pdl.errors import ConfigError

__all__ = [
    "TOPOLOGY_KINDS",
    "Graph",
    "TopologyKind",
    "build_graph",
    "describe",
    "mh_weight",
    "mixing_matrix",
    "mixing_weights",
    "second_largest_eigenvalue_modulus",
    "spectral_gap",
    "topology_problems",
]

TopologyKind = Literal["ring", "torus", "exponential", "full", "star", "explicit"]
TOPOLOGY_KINDS: tuple[str, ...] = get_args(TopologyKind)

# Above this many peers describe() prints each peer's row as a list: an n x n matrix of
# mostly zeros stops being readable in a terminal.
_MAX_MATRIX_PEERS = 16

# Tolerance for "this matrix is symmetric" when choosing eigvalsh over eigvals.
_SYMMETRY_ATOL = 1e-12


@dataclass(frozen=True, slots=True)
class Graph:
    """An undirected graph over named peers.

    ``names`` fixes each peer's index (its row in the mixing matrix). ``neighbors`` maps each
    name to its neighbours sorted by index; it is symmetric and has no self loops. The
    constructor checks these invariants, so a ``Graph`` that exists is well formed.
    """

    names: tuple[str, ...]
    neighbors: Mapping[str, tuple[str, ...]]
    _index_of: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        if not names:
            raise ValueError("a graph needs at least one peer")
        index_of = {name: i for i, name in enumerate(names)}
        if len(index_of) != len(names):
            raise ValueError(f"duplicate peer names in {names!r}")
        if set(self.neighbors) != set(names):
            raise ValueError("neighbors must have exactly one entry per peer name")
        neighbors: dict[str, tuple[str, ...]] = {}
        for name in names:
            adjacent = tuple(self.neighbors[name])
            for other in adjacent:
                if other not in index_of:
                    raise ValueError(f"{name!r} has unknown neighbour {other!r}")
                if other == name:
                    raise ValueError(f"self loop on {name!r}")
            if len(set(adjacent)) != len(adjacent):
                raise ValueError(f"{name!r} lists a neighbour twice")
            if list(adjacent) != sorted(adjacent, key=index_of.__getitem__):
                raise ValueError(f"neighbours of {name!r} are not sorted by index")
            neighbors[name] = adjacent
        for name, adjacent in neighbors.items():
            for other in adjacent:
                if name not in neighbors[other]:
                    raise ValueError(f"edge {name!r} -> {other!r} has no reverse edge")
        # Frozen dataclass: normalise the fields once, read-only from here on.
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "neighbors", MappingProxyType(neighbors))
        object.__setattr__(self, "_index_of", MappingProxyType(index_of))

    def degree(self, name: str) -> int:
        """Number of neighbours of ``name``."""
        return len(self.neighbors[name])

    def index(self, name: str) -> int:
        """Position of ``name`` in ``names``, i.e. its row in the mixing matrix."""
        return self._index_of[name]

    def edges(self) -> list[tuple[str, str]]:
        """Each undirected edge once, as (lower index, higher index), sorted."""
        return [
            (name, other)
            for i, name in enumerate(self.names)
            for other in self.neighbors[name]
            if self._index_of[other] > i
        ]

    def is_connected(self) -> bool:
        """Whether every peer can reach every other peer."""
        return not _unreachable(self.names, self.neighbors)


def _unreachable(names: Sequence[str], neighbors: Mapping[str, Sequence[str]]) -> list[str]:
    """Names not reachable from ``names[0]``, in ``names`` order (empty if connected)."""
    if not names:
        return []
    seen = {names[0]}
    frontier = deque([names[0]])
    while frontier:
        for other in neighbors[frontier.popleft()]:
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    return [name for name in names if name not in seen]


def _is_positive_int(value: object) -> bool:
    # bool is an int subclass; `rows = true` in TOML is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _square_factorisation(n: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == n, rows <= cols, as square as possible."""
    rows = math.isqrt(n)
    while n % rows:
        rows -= 1
    return rows, n // rows


def _join(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


def _edge_problems(edges: Sequence[object], names: Sequence[str]) -> list[str]:
    known = set(names)
    problems: list[str] = []
    first_seen: dict[frozenset[str], int] = {}
    adjacency: dict[str, list[str]] = {name: [] for name in names}
    for position, edge in enumerate(edges):
        key = f"topology.edges[{position}]"
        if (
            isinstance(edge, str | bytes)
            or not isinstance(edge, Sequence)
            or len(edge) != 2
            or not all(isinstance(end, str) for end in edge)
        ):
            problems.append(f"{key}: must be a pair of peer names, got {edge!r}")
            continue
        a, b = edge[0], edge[1]
        unknown = [end for end in dict.fromkeys((a, b)) if end not in known]
        if unknown:
            problems.extend(f"{key}: unknown peer {end!r} in edge ({a}, {b})" for end in unknown)
            continue
        if a == b:
            problems.append(f"{key}: self loop on {a!r}; a peer always mixes with itself")
            continue
        pair = frozenset((a, b))
        if pair in first_seen:
            problems.append(
                f"{key}: duplicate edge ({a}, {b}), already given as "
                f"topology.edges[{first_seen[pair]}] (edges are undirected)"
            )
            continue
        first_seen[pair] = position
        adjacency[a].append(b)
        adjacency[b].append(a)
    unreachable = _unreachable(list(adjacency), adjacency)
    if unreachable:
        problems.append(
            f"topology.edges: the graph is disconnected; {_join(unreachable)} "
            f"cannot be reached from {next(iter(adjacency))}"
        )
    return problems


def topology_problems(
    kind: str,
    names: Sequence[str],
    *,
    rows: int | None = None,
    cols: int | None = None,
    center: str | None = None,
    edges: Sequence[tuple[str, str]] | None = None,
) -> list[str]:
    """Every problem with a topology request, each naming its config key. Empty if valid."""
    problems: list[str] = []
    names = list(names)
    n = len(names)
    names_ok = True
    if n < 1:
        problems.append("peers: need at least 1 peer, got none")
        names_ok = False
    bad_names = [repr(name) for name in names if not isinstance(name, str) or not name]
    if bad_names:
        problems.append(f"peers: peer names must be non-empty strings, got {_join(bad_names)}")
        names_ok = False
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    duplicates = [name for name, count in counts.items() if count > 1]
    if duplicates:
        problems.append(f"peers: duplicate peer names {_join(duplicates)}")
        names_ok = False

    if kind not in TOPOLOGY_KINDS:
        problems.append(f"topology.kind: {kind!r} is not one of {', '.join(TOPOLOGY_KINDS)}")
        return problems

    unused = {
        "rows": (rows, "torus"),
        "cols": (cols, "torus"),
        "center": (center, "star"),
        "edges": (edges, "explicit"),
    }
    for key, (value, used_by) in unused.items():
        if value is not None and kind != used_by:
            problems.append(f"topology.{key}: only used by kind {used_by!r}, not {kind!r}; remove it")

    if kind == "torus":
        dims_ok = True
        for key, value in (("rows", rows), ("cols", cols)):
            if value is not None and not _is_positive_int(value):
                problems.append(f"topology.{key}: must be an integer >= 1, got {value!r}")
                dims_ok = False
        if dims_ok and n >= 1:
            if rows is not None and cols is not None:
                if rows * cols != n:
                    problems.append(f"topology.rows: {rows} x {cols} = {rows * cols} but there are {n} peers")
            elif rows is not None and n % rows:
                problems.append(f"topology.rows: {n} peers do not split into {rows} equal rows")
            elif cols is not None and n % cols:
                problems.append(f"topology.cols: {n} peers do not split into {cols} equal cols")
    elif kind == "star":
        if center is not None and center not in counts:
            problems.append(f"topology.center: {center!r} is not one of the peers")
    elif kind == "explicit":
        if edges is None:
            problems.append("topology.edges: required for kind 'explicit': a list of [name, name] pairs")
        elif isinstance(edges, str | bytes) or not isinstance(edges, Sequence):
            problems.append(f"topology.edges: must be a list of [name, name] pairs, got {edges!r}")
        elif names_ok:
            problems.extend(_edge_problems(edges, names))
    return problems


def _offset_neighbors(n: int, offsets: set[int]) -> list[set[int]]:
    """Circulant graph: i ~ i ± k (mod n) for each k in offsets, minus self loops."""
    adjacency: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        for offset in offsets:
            for j in ((i + offset) % n, (i - offset) % n):
                if j != i:
                    adjacency[i].add(j)
                    adjacency[j].add(i)
    return adjacency


def _torus_neighbors(rows: int, cols: int) -> list[set[int]]:
    # Peer i sits at (i // cols, i % cols); sets dedupe the wraparound when a side is 1 or 2.
    adjacency: list[set[int]] = [set() for _ in range(rows * cols)]
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                j = (rr % rows) * cols + cc % cols
                if j != i:
                    adjacency[i].add(j)
                    adjacency[j].add(i)
    return adjacency


def build_graph(
    kind: TopologyKind,
    names: Sequence[str],
    *,
    rows: int | None = None,
    cols: int | None = None,
    center: str | None = None,
    edges: Sequence[tuple[str, str]] | None = None,
) -> Graph:
    """Build the graph of ``kind`` over ``names``; raise ConfigError listing every problem.

    ``rows``/``cols`` are for ``torus`` (default: the most square factorisation, rows <=
    cols), ``center`` for ``star`` (default: the first peer) and ``edges`` for ``explicit``.
    """
    problems = topology_problems(kind, names, rows=rows, cols=cols, center=center, edges=edges)
    if problems:
        raise ConfigError(problems)
    names = tuple(names)
    n = len(names)
    index_of = {name: i for i, name in enumerate(names)}
    adjacency: list[set[int]]
    if kind == "ring":
        adjacency = _offset_neighbors(n, {1})
    elif kind == "exponential":
        adjacency = _offset_neighbors(n, {2**k for k in range(n.bit_length()) if 2**k < n})
    elif kind == "torus":
        if rows is None and cols is None:
            rows, cols = _square_factorisation(n)
        elif rows is None:
            assert cols is not None
            rows = n // cols
        elif cols is None:
            cols = n // rows
        adjacency = _torus_neighbors(rows, cols)
    elif kind == "full":
        adjacency = [set(range(n)) - {i} for i in range(n)]
    elif kind == "star":
        hub = index_of[center if center is not None else names[0]]
        adjacency = [{hub} - {i} for i in range(n)]
        adjacency[hub] = set(range(n)) - {hub}
    else:
        assert kind == "explicit" and edges is not None
        adjacency = [set() for _ in range(n)]
        for a, b in edges:
            adjacency[index_of[a]].add(index_of[b])
            adjacency[index_of[b]].add(index_of[a])
    return Graph(
        names=names,
        neighbors={names[i]: tuple(names[j] for j in sorted(adjacency[i])) for i in range(n)},
    )


def mh_weight(degree_i: int, degree_j: int) -> float:
    """Metropolis-Hastings weight of edge (i, j): ``1 / (1 + max(d_i, d_j))``."""
    if degree_i < 0 or degree_j < 0:
        raise ValueError(f"degrees must be >= 0, got {degree_i} and {degree_j}")
    return 1.0 / (1 + max(degree_i, degree_j))


def mixing_weights(
    graph: Graph,
    self_name: str,
    *,
    live_neighbor_degrees: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """The row of W for ``self_name``: ``{neighbour: w_ij, ..., self_name: w_ii}``.

    By default every neighbour in ``graph`` gets weight, with degrees from ``graph``. With
    ``live_neighbor_degrees`` (neighbour -> the degree it reported) only those neighbours
    get weight and this peer's own degree is their count; if every peer does this with
    degrees that agree, the rows still form a symmetric doubly stochastic matrix.
    Neighbours come in index order, ``self_name`` last.
    """
    if live_neighbor_degrees is None:
        own_degree = graph.degree(self_name)
        neighbor_degrees = {other: graph.degree(other) for other in graph.neighbors[self_name]}
    else:
        adjacent = set(graph.neighbors[self_name])
        strangers = sorted(set(live_neighbor_degrees) - adjacent)
        if strangers:
            raise ValueError(f"{self_name!r} is not adjacent to {', '.join(strangers)}")
        too_small = {k: d for k, d in live_neighbor_degrees.items() if d < 1}
        if too_small:
            # A live neighbour has at least one neighbour: us.
            raise ValueError(f"live neighbour degrees must be >= 1, got {too_small}")
        own_degree = len(live_neighbor_degrees)
        neighbor_degrees = {
            other: live_neighbor_degrees[other] for other in sorted(live_neighbor_degrees, key=graph.index)
        }
    row = {other: mh_weight(own_degree, degree) for other, degree in neighbor_degrees.items()}
    # fsum: the self weight is exact to the last bit, so rows sum to 1 as closely as floats can.
    row[self_name] = 1.0 - math.fsum(row.values())
    return row


def mixing_matrix(graph: Graph) -> npt.NDArray[np.float64]:
    """The full n x n MH matrix (float64, symmetric, doubly stochastic), rows in index order.

    Built row by row from :func:`mixing_weights`, so it equals what every peer computes.
    """
    n = len(graph.names)
    weights = np.zeros((n, n), dtype=np.float64)
    for name in graph.names:
        i = graph.index(name)
        for other, weight in mixing_weights(graph, name).items():
            weights[i, graph.index(other)] = weight
    return weights


def second_largest_eigenvalue_modulus(w: npt.NDArray[np.floating]) -> float:
    """λ2: the largest ``|eigenvalue|`` of ``w`` once the one eigenvalue 1 is set aside.

    Disagreement between peers shrinks by about λ2 per gossip round. A disconnected graph
    has eigenvalue 1 more than once, so λ2 = 1 (no convergence). For a single peer, 0.
    """
    matrix = np.asarray(w, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"need a non-empty square matrix, got shape {matrix.shape}")
    if matrix.shape[0] == 1:
        return 0.0
    if np.allclose(matrix, matrix.T, rtol=0.0, atol=_SYMMETRY_ATOL):
        eigenvalues = np.linalg.eigvalsh(matrix)  # real, ascending
        # Drop the top one: for a stochastic W it is the eigenvalue 1.
        return float(np.max(np.abs(eigenvalues[:-1])))
    complex_eigenvalues = np.linalg.eigvals(matrix)
    consensus = int(np.argmin(np.abs(complex_eigenvalues - 1.0)))
    return float(np.max(np.abs(np.delete(complex_eigenvalues, consensus))))


def spectral_gap(w: npt.NDArray[np.floating]) -> float:
    """``1 - λ2``: larger means faster consensus; 0 means none (disconnected graph)."""
    return 1.0 - second_largest_eigenvalue_modulus(w)


def _format_weight(weight: float) -> str:
    return f"{weight:.4f}"


def describe(graph: Graph) -> str:
    """A human-readable report of ``graph``: adjacency, MH weights, λ2 and spectral gap."""
    names = graph.names
    weights = mixing_matrix(graph)
    slem = second_largest_eigenvalue_modulus(weights)
    degrees = [graph.degree(name) for name in names]
    name_width = max(len(name) for name in names)

    lines = [
        f"peers: {len(names)}   edges: {len(graph.edges())}   "
        f"degree: min {min(degrees)}, max {max(degrees)}   "
        f"connected: {'yes' if graph.is_connected() else 'NO'}",
        "",
        "adjacency (peer: neighbours):",
    ]
    for name in names:
        adjacent = ", ".join(graph.neighbors[name]) or "(none)"
        lines.append(f"  {name:<{name_width}} [{graph.degree(name)}]: {adjacent}")

    lines += ["", "Metropolis-Hastings mixing weights W (row i: what peer i averages):"]
    if len(names) <= _MAX_MATRIX_PEERS:
        # "." marks a zero (not neighbours) so the sparsity pattern stands out.
        column_width = max(6, name_width)
        header = " " * (name_width + 3) + " ".join(f"{name:>{column_width}}" for name in names)
        lines.append(header)
        for i, name in enumerate(names):
            cells = " ".join(f"{_format_weight(w) if w != 0.0 else '.':>{column_width}}" for w in weights[i])
            lines.append(f"  {name:<{name_width}} {cells}".rstrip())
    else:
        for i, name in enumerate(names):
            entries = ", ".join(
                f"{names[j]}={_format_weight(float(weights[i, j]))}" for j in range(len(names)) if weights[i, j] != 0.0
            )
            lines.append(f"  {name + ':':<{name_width + 1}} [{entries}]")

    lines += [
        "",
        f"λ2 (second largest eigenvalue modulus): {slem:.4f}",
        f"spectral gap (1 - λ2):                  {1.0 - slem:.4f}",
        f"gossip rounds per 10x less disagreement: {_rounds_per_decade(slem)}",
    ]
    return "\n".join(lines) + "\n"


def _rounds_per_decade(slem: float) -> str:
    # Disagreement decays like λ2^t, so one decade takes ln(10) / -ln(λ2) rounds.
    if slem >= 1.0 - 1e-12:
        return "never (λ2 = 1: the graph is disconnected)"
    if slem <= 1e-12:
        return "1 (exact average in one round)"
    return f"about {math.log(10.0) / -math.log(slem):.1f}"
