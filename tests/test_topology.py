"""Unit tests for p2pdl.core.topology: graph construction, validation and MH mixing weights."""

from __future__ import annotations

import itertools
import math
from typing import get_args

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdl.core.topology import (
    TOPOLOGY_KINDS,
    Graph,
    TopologyKind,
    build_graph,
    describe,
    mh_weight,
    mixing_matrix,
    mixing_weights,
    second_largest_eigenvalue_modulus,
    spectral_gap,
    topology_problems,
)
from p2pdl.errors import ConfigError

KINDS: tuple[TopologyKind, ...] = get_args(TopologyKind)
SIZES = range(1, 18)


def peer_names(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def chain_edges(names: list[str]) -> list[tuple[str, str]]:
    return list(itertools.pairwise(names))


def any_graph(kind: TopologyKind, n: int) -> Graph:
    """A valid graph of ``kind`` on n peers (explicit: a path plus one chord)."""
    names = peer_names(n)
    if kind == "explicit":
        edges = chain_edges(names)
        if n >= 4:
            edges.append((names[0], names[n // 2 + 1]))
        return build_graph(kind, names, edges=edges)
    return build_graph(kind, names)


def assert_doubly_stochastic(weights: npt.NDArray[np.float64]) -> None:
    n = weights.shape[0]
    assert weights.shape == (n, n)
    assert weights.dtype == np.float64
    np.testing.assert_array_equal(weights, weights.T)
    np.testing.assert_allclose(weights.sum(axis=0), np.ones(n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), np.ones(n), rtol=0, atol=1e-12)
    assert (weights >= 0).all()


def ring_slem_closed_form(n: int) -> float:
    # Ring MH matrix is (I + A) / 3, a circulant with eigenvalues (1 + 2 cos(2 pi k / n)) / 3.
    return max(abs((1 + 2 * math.cos(2 * math.pi * k / n)) / 3) for k in range(1, n))


# --- kinds ----------------------------------------------------------------------------------


def test_topology_kinds_match_literal() -> None:
    assert TOPOLOGY_KINDS == ("ring", "torus", "exponential", "full", "star", "explicit")


def test_ring_small_cases() -> None:
    assert build_graph("ring", ["a"]).edges() == []
    assert build_graph("ring", ["a", "b"]).edges() == [("a", "b")]
    assert build_graph("ring", ["a", "b", "c"]).edges() == [("a", "b"), ("a", "c"), ("b", "c")]
    ring = build_graph("ring", peer_names(6))
    assert ring.neighbors["p0"] == ("p1", "p5")
    assert ring.neighbors["p3"] == ("p2", "p4")


@pytest.mark.parametrize("n", range(3, 18))
def test_ring_slem_matches_closed_form(n: int) -> None:
    slem = second_largest_eigenvalue_modulus(mixing_matrix(build_graph("ring", peer_names(n))))
    assert slem == pytest.approx(ring_slem_closed_form(n), abs=1e-9)
    if n >= 5:
        assert slem == pytest.approx((1 + 2 * math.cos(2 * math.pi / n)) / 3, abs=1e-9)


def test_ring_of_8_slem() -> None:
    slem = second_largest_eigenvalue_modulus(mixing_matrix(build_graph("ring", peer_names(8))))
    assert slem == pytest.approx(0.8047, abs=1e-4)
    assert slem == pytest.approx((1 + 2 * math.cos(math.pi / 4)) / 3, abs=1e-9)


def test_torus_4x4_slem_is_0_6() -> None:
    graph = build_graph("torus", peer_names(16))
    assert {graph.degree(name) for name in graph.names} == {4}
    weights = mixing_matrix(graph)
    assert second_largest_eigenvalue_modulus(weights) == pytest.approx(0.6, abs=1e-9)
    assert spectral_gap(weights) == pytest.approx(0.4, abs=1e-9)


def test_torus_layout_and_wraparound() -> None:
    graph = build_graph("torus", peer_names(12), rows=3, cols=4)
    # p5 is at (1, 1): up p1, down p9, left p4, right p6.
    assert graph.neighbors["p5"] == ("p1", "p4", "p6", "p9")
    # p0 at (0, 0) wraps to p8 (row 2) and p3 (col 3).
    assert graph.neighbors["p0"] == ("p1", "p3", "p4", "p8")


@pytest.mark.parametrize(
    ("n", "rows", "cols", "expected_rows"),
    [
        (12, None, None, 3),  # most square: 3 x 4
        (16, None, None, 4),
        (7, None, None, 1),  # prime: a 1 x 7 ring
        (12, 2, None, 2),
        (12, None, 2, 6),
        (6, 6, 1, 6),
    ],
)
def test_torus_dimensions(n: int, rows: int | None, cols: int | None, expected_rows: int) -> None:
    graph = build_graph("torus", peer_names(n), rows=rows, cols=cols)
    expected = build_graph("torus", peer_names(n), rows=expected_rows, cols=n // expected_rows)
    assert graph == expected


def test_torus_prime_is_ring() -> None:
    assert build_graph("torus", peer_names(7)) == build_graph("ring", peer_names(7))


def test_torus_dedupes_small_dimensions() -> None:
    # 2 x 4: up and down are the same peer, so degree 3.
    graph = build_graph("torus", peer_names(8), rows=2, cols=4)
    assert {graph.degree(name) for name in graph.names} == {3}
    # 2 x 2: a 4-cycle.
    graph = build_graph("torus", peer_names(4), rows=2, cols=2)
    assert {graph.degree(name) for name in graph.names} == {2}
    assert build_graph("torus", ["solo"]).edges() == []


def test_exponential_of_8_has_degree_5() -> None:
    graph = build_graph("exponential", peer_names(8))
    assert {graph.degree(name) for name in graph.names} == {5}
    assert graph.neighbors["p0"] == ("p1", "p2", "p4", "p6", "p7")


@pytest.mark.parametrize("n", SIZES)
def test_exponential_matches_definition(n: int) -> None:
    graph = build_graph("exponential", peer_names(n))
    offsets = [2**k for k in range(n) if 2**k < n]
    for i, name in enumerate(graph.names):
        expected = {(i + s) % n for s in offsets} | {(i - s) % n for s in offsets}
        expected.discard(i)
        assert {graph.index(other) for other in graph.neighbors[name]} == expected


@pytest.mark.parametrize("n", SIZES)
def test_full_graph_is_uniform_average(n: int) -> None:
    graph = build_graph("full", peer_names(n))
    assert len(graph.edges()) == n * (n - 1) // 2
    weights = mixing_matrix(graph)
    np.testing.assert_allclose(weights, np.full((n, n), 1.0 / n), rtol=0, atol=1e-15)
    assert second_largest_eigenvalue_modulus(weights) == pytest.approx(0.0, abs=1e-9)
    assert spectral_gap(weights) == pytest.approx(1.0, abs=1e-9)


def test_star_degrees() -> None:
    graph = build_graph("star", peer_names(6))
    assert graph.degree("p0") == 5
    assert [graph.degree(f"p{i}") for i in range(1, 6)] == [1] * 5
    centered = build_graph("star", peer_names(6), center="p3")
    assert centered.degree("p3") == 5
    assert centered.neighbors["p0"] == ("p3",)
    assert centered.neighbors["p3"] == ("p0", "p1", "p2", "p4", "p5")
    # Leaves get 1 / (1 + 5) from the hub and keep the rest.
    assert mixing_weights(centered, "p0") == {
        "p3": pytest.approx(1 / 6),
        "p0": pytest.approx(5 / 6),
    }


def test_explicit_graph() -> None:
    graph = build_graph("explicit", ["a", "b", "c", "d"], edges=[("c", "a"), ("a", "b"), ("d", "c")])
    assert graph.edges() == [("a", "b"), ("a", "c"), ("c", "d")]
    assert graph.neighbors["a"] == ("b", "c")
    assert graph.is_connected()
    # TOML gives lists, not tuples.
    from_toml = build_graph("explicit", ["a", "b"], edges=[["a", "b"]])  # type: ignore[list-item]
    assert from_toml.edges() == [("a", "b")]


# --- properties of W for every kind ------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_mixing_matrix_is_symmetric_doubly_stochastic(kind: TopologyKind, n: int) -> None:
    graph = any_graph(kind, n)
    assert graph.is_connected()
    weights = mixing_matrix(graph)
    assert_doubly_stochastic(weights)
    slem = second_largest_eigenvalue_modulus(weights)
    assert 0.0 <= slem < 1.0 or n == 1
    for name in graph.names:
        assert name not in graph.neighbors[name]
        for other in graph.neighbors[name]:
            assert name in graph.neighbors[other]
        assert list(graph.neighbors[name]) == sorted(graph.neighbors[name], key=graph.index)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_per_peer_row_equals_matrix_row(kind: TopologyKind, n: int) -> None:
    graph = any_graph(kind, n)
    weights = mixing_matrix(graph)
    for name in graph.names:
        row = mixing_weights(graph, name)
        assert list(row)[-1] == name
        assert set(row) == {name, *graph.neighbors[name]}
        dense = np.zeros(n)
        for other, weight in row.items():
            dense[graph.index(other)] = weight
        np.testing.assert_array_equal(dense, weights[graph.index(name)])


@st.composite
def connected_edge_lists(draw: st.DrawFn) -> tuple[list[str], list[tuple[str, str]]]:
    """A random connected graph: a random spanning tree plus random extra edges."""
    n = draw(st.integers(min_value=1, max_value=17))
    names = peer_names(n)
    order = draw(st.permutations(names))
    pairs: set[frozenset[str]] = set()
    for i in range(1, n):
        parent = order[draw(st.integers(min_value=0, max_value=i - 1))]
        pairs.add(frozenset((order[i], parent)))
    if n >= 2:
        extra = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names)), max_size=2 * n))
        pairs |= {frozenset(pair) for pair in extra if pair[0] != pair[1]}
    edges = [tuple(sorted(pair)) for pair in pairs]
    return names, [(a, b) for a, b in draw(st.permutations(edges))]


@settings(max_examples=150, deadline=None)
@given(connected_edge_lists())
def test_explicit_random_graphs_mix_correctly(
    case: tuple[list[str], list[tuple[str, str]]],
) -> None:
    names, edges = case
    graph = build_graph("explicit", names, edges=edges)
    assert len(graph.edges()) == len(edges)
    weights = mixing_matrix(graph)
    assert_doubly_stochastic(weights)
    for name in names:
        assert weights[graph.index(name), graph.index(name)] > 0
    assert second_largest_eigenvalue_modulus(weights) < 1.0 or len(names) == 1


@pytest.mark.parametrize("n", range(3, 18))
@pytest.mark.parametrize("kind", KINDS)
def test_live_rows_after_churn_stay_doubly_stochastic(kind: TopologyKind, n: int) -> None:
    graph = any_graph(kind, n)
    for gone in (graph.names[0], graph.names[n // 2]):
        survivors = [name for name in graph.names if name != gone]

        def live_neighbors(name: str, gone: str = gone) -> list[str]:
            return [other for other in graph.neighbors[name] if other != gone]

        # Every survivor builds its own row, from the degrees its neighbours report
        # in the reduced graph. Nobody sees the whole matrix.
        weights = np.zeros((n - 1, n - 1))
        position = {name: k for k, name in enumerate(survivors)}
        for name in survivors:
            reported = {other: len(live_neighbors(other)) for other in live_neighbors(name)}
            row = mixing_weights(graph, name, live_neighbor_degrees=reported)
            assert set(row) == {name, *reported}
            for other, weight in row.items():
                weights[position[name], position[other]] = weight
        assert_doubly_stochastic(weights)


def test_live_degrees_equal_to_graph_degrees_give_default_row() -> None:
    graph = build_graph("exponential", peer_names(11))
    for name in graph.names:
        reported = {other: graph.degree(other) for other in graph.neighbors[name]}
        assert mixing_weights(graph, name, live_neighbor_degrees=reported) == mixing_weights(graph, name)


def test_live_degrees_with_no_neighbours_keeps_everything() -> None:
    graph = build_graph("ring", peer_names(5))
    assert mixing_weights(graph, "p2", live_neighbor_degrees={}) == {"p2": 1.0}


def test_live_degrees_reject_strangers_and_zero_degrees() -> None:
    graph = build_graph("ring", peer_names(6))
    with pytest.raises(ValueError, match="p3"):
        mixing_weights(graph, "p0", live_neighbor_degrees={"p3": 2})
    with pytest.raises(ValueError, match=">= 1"):
        mixing_weights(graph, "p0", live_neighbor_degrees={"p1": 0})


@pytest.mark.parametrize("kind", ["ring", "torus", "exponential", "star"])
def test_gossip_disagreement_decays_at_slem_rate(kind: TopologyKind) -> None:
    weights = mixing_matrix(build_graph(kind, peer_names(12)))
    slem = second_largest_eigenvalue_modulus(weights)
    values = np.random.default_rng(0).normal(size=12)
    disagreement = values - values.mean()
    for _ in range(30):
        next_values = weights @ values
        assert next_values.mean() == pytest.approx(values.mean(), abs=1e-12)
        next_disagreement = next_values - next_values.mean()
        # W is symmetric, so the contraction on the disagreement subspace is exactly SLEM.
        assert np.linalg.norm(next_disagreement) <= slem * np.linalg.norm(disagreement) + 1e-12
        values, disagreement = next_values, next_disagreement


# --- weights and spectra -----------------------------------------------------------------


def test_mh_weight() -> None:
    assert mh_weight(2, 2) == pytest.approx(1 / 3)
    assert mh_weight(1, 5) == pytest.approx(1 / 6)
    assert mh_weight(5, 1) == mh_weight(1, 5)
    with pytest.raises(ValueError, match=">= 0"):
        mh_weight(-1, 2)


def test_slem_of_disconnected_graph_is_one() -> None:
    graph = Graph(names=("a", "b", "c", "d"), neighbors={"a": ("b",), "b": ("a",), "c": ("d",), "d": ("c",)})
    assert not graph.is_connected()
    weights = mixing_matrix(graph)
    assert_doubly_stochastic(weights)
    assert second_largest_eigenvalue_modulus(weights) == pytest.approx(1.0, abs=1e-9)
    assert spectral_gap(weights) == pytest.approx(0.0, abs=1e-9)
    assert "disconnected" in describe(graph)


def test_slem_edge_cases() -> None:
    assert second_largest_eigenvalue_modulus(np.ones((1, 1))) == 0.0
    # Non-symmetric but column-stochastic: eigenvalues 1 and 0.5.
    non_symmetric = np.array([[0.75, 0.5], [0.25, 0.5]])
    assert second_largest_eigenvalue_modulus(non_symmetric) == pytest.approx(0.25, abs=1e-9)
    with pytest.raises(ValueError, match="square"):
        second_largest_eigenvalue_modulus(np.ones((2, 3)))


# --- Graph invariants --------------------------------------------------------------------


def test_graph_accessors() -> None:
    graph = build_graph("ring", ["x", "y", "z", "w"])
    assert graph.index("z") == 2
    assert graph.degree("x") == 2
    assert graph.edges() == [("x", "y"), ("x", "w"), ("y", "z"), ("z", "w")]
    with pytest.raises(TypeError):
        graph.neighbors["x"] = ()  # type: ignore[index]


@pytest.mark.parametrize(
    ("names", "neighbors", "match"),
    [
        ((), {}, "at least one"),
        (("a", "a"), {"a": ()}, "duplicate"),
        (("a", "b"), {"a": ("b",)}, "one entry per peer"),
        (("a", "b"), {"a": ("b",), "b": ()}, "no reverse edge"),
        (("a", "b"), {"a": ("a",), "b": ()}, "self loop"),
        (("a", "b"), {"a": ("c",), "b": ()}, "unknown"),
        (("a", "b", "c"), {"a": ("c", "b"), "b": ("a",), "c": ("a",)}, "sorted"),
    ],
)
def test_graph_rejects_broken_invariants(
    names: tuple[str, ...], neighbors: dict[str, tuple[str, ...]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Graph(names=names, neighbors=neighbors)


# --- validation --------------------------------------------------------------------------


def problems_of(kind: str, names: list[str], **kwargs: object) -> list[str]:
    return topology_problems(
        kind,
        names,
        rows=kwargs.get("rows"),  # type: ignore[arg-type]
        cols=kwargs.get("cols"),  # type: ignore[arg-type]
        center=kwargs.get("center"),  # type: ignore[arg-type]
        edges=kwargs.get("edges"),  # type: ignore[arg-type]
    )


def test_valid_requests_have_no_problems() -> None:
    assert problems_of("ring", peer_names(5)) == []
    assert problems_of("torus", peer_names(16), rows=4, cols=4) == []
    assert problems_of("star", peer_names(3), center="p2") == []
    assert problems_of("explicit", ["a"], edges=[]) == []


def test_torus_shape_mismatch_message() -> None:
    with pytest.raises(ConfigError) as caught:
        build_graph("torus", peer_names(16), rows=3, cols=5)
    assert caught.value.problems == ("topology.rows: 3 x 5 = 15 but there are 16 peers",)


@pytest.mark.parametrize(
    ("kind", "names", "kwargs", "expected"),
    [
        ("ring", [], {}, "peers: need at least 1 peer"),
        ("ring", ["a", "b", "a"], {}, "peers: duplicate peer names a"),
        ("ring", ["a", ""], {}, "peers: peer names must be non-empty strings"),
        ("mesh", ["a"], {}, "topology.kind: 'mesh' is not one of ring, torus"),
        ("ring", ["a"], {"rows": 1}, "topology.rows: only used by kind 'torus', not 'ring'"),
        ("full", ["a"], {"cols": 1}, "topology.cols: only used by kind 'torus'"),
        ("ring", ["a"], {"center": "a"}, "topology.center: only used by kind 'star'"),
        ("star", ["a"], {"edges": []}, "topology.edges: only used by kind 'explicit'"),
        ("torus", ["a"], {"rows": 0}, "topology.rows: must be an integer >= 1, got 0"),
        ("torus", ["a"], {"cols": -2}, "topology.cols: must be an integer >= 1, got -2"),
        ("torus", ["a"], {"rows": True}, "topology.rows: must be an integer >= 1, got True"),
        ("torus", peer_names(16), {"rows": 3}, "topology.rows: 16 peers do not split into 3"),
        ("torus", peer_names(10), {"cols": 4}, "topology.cols: 10 peers do not split into 4"),
        ("star", ["a", "b"], {"center": "z"}, "topology.center: 'z' is not one of the peers"),
        ("explicit", ["a", "b"], {}, "topology.edges: required for kind 'explicit'"),
    ],
)
def test_each_problem_names_its_key(kind: str, names: list[str], kwargs: dict[str, object], expected: str) -> None:
    problems = problems_of(kind, names, **kwargs)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        build_graph("ring", ["a", "a"], rows=2, center="a")
    keys = [problem.split(":")[0] for problem in caught.value.problems]
    assert keys == ["peers", "topology.rows", "topology.center"]


def test_explicit_edge_problems_each_named() -> None:
    names = ["a", "b", "c", "d", "e"]
    edges = [
        ("a", "b"),
        ("b", "zed"),  # unknown
        ("c", "c"),  # self loop
        ("b", "a"),  # duplicate, reversed
        ("a", "b"),  # duplicate, same orientation
        ("a", "c"),
        ("d", "e"),  # d and e are cut off from a
        ("a",),  # malformed
    ]
    problems = problems_of("explicit", names, edges=edges)
    assert problems == [
        "topology.edges[1]: unknown peer 'zed' in edge (b, zed)",
        "topology.edges[2]: self loop on 'c'; a peer always mixes with itself",
        "topology.edges[3]: duplicate edge (b, a), already given as topology.edges[0] (edges are undirected)",
        "topology.edges[4]: duplicate edge (a, b), already given as topology.edges[0] (edges are undirected)",
        "topology.edges[7]: must be a pair of peer names, got ('a',)",
        "topology.edges: the graph is disconnected; d, e cannot be reached from a",
    ]
    with pytest.raises(ConfigError) as caught:
        build_graph("explicit", names, edges=edges)  # type: ignore[arg-type]
    assert list(caught.value.problems) == problems


def test_explicit_without_edges_between_several_peers_is_disconnected() -> None:
    assert problems_of("explicit", ["a", "b", "c"], edges=[]) == [
        "topology.edges: the graph is disconnected; b, c cannot be reached from a"
    ]


# --- describe ----------------------------------------------------------------------------


def test_describe_small_graph_prints_matrix() -> None:
    graph = build_graph("ring", peer_names(8))
    text = describe(graph)
    slem = second_largest_eigenvalue_modulus(mixing_matrix(graph))
    assert f"{slem:.4f}" in text
    assert "0.8047" in text
    assert "0.1953" in text  # spectral gap
    assert "degree: min 2, max 2" in text
    assert "p0 [2]: p1, p7" in text
    assert "\n         p0     p1     p2     p3     p4     p5     p6     p7\n" in text
    assert "  p0 0.3333 0.3333      .      .      .      .      . 0.3333" in text


def test_describe_large_graph_prints_rows_as_lists() -> None:
    graph = build_graph("torus", peer_names(20))
    text = describe(graph)
    assert "p0:  [p0=0.2000, p1=0.2000, p4=0.2000, p5=0.2000, p15=0.2000]" in text
    assert f"{second_largest_eigenvalue_modulus(mixing_matrix(graph)):.4f}" in text


def test_describe_star_degree_range() -> None:
    text = describe(build_graph("star", peer_names(5)))
    assert "degree: min 1, max 4" in text
    # Differences between leaves decay by the leaves' self weight, 1 - 1/n.
    assert "λ2 (second largest eigenvalue modulus): 0.8000" in text
