"""Shared parameters: one parameter entering the graph at several operations (tied embeddings, CaiT's
class token entering the class-attention block's concatenation and its residual sum).

A parameter's per-sample gradient is the sum of its uses' contributions, and the diagonal needs its
square (eqs. 5, 17, 25), so the uses cannot be squared one by one. They are merged into one per-sample
rule over the *region* between them: every node on a path from one of the uses to the last one. When
nothing in the region except the last node feeds anything outside it (shape queries aside), every path
from the uses to the logits passes through the last node, and the per-sample vector-Jacobian product
of the region (recomputed by torch.func from the region's input-dependent inputs, parameters of other
uses inside it held fixed) with the gradient at the last node's output is exactly the summed per-sample
gradient. Otherwise the uses are refused with that reason. Parameters used at several places are never
piecewise linear in the exact estimator's sense (``support.py`` refuses them for exact).
"""
from __future__ import annotations

from torch import fx, nn

from nfm_cli.curvature.graph import Use, recomputed_rule, unsupported, where


def _groups(uses: list[Use]) -> list[list[Use]]:
    """Uses connected by shared parameters (transitively), in graph order; singletons left out."""
    parent = list(range(len(uses)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    owner: dict[str, int] = {}
    for i, use in enumerate(uses):
        for name in use.params.values():
            if name in owner:
                parent[root(i)] = root(owner[name])
            else:
                owner[name] = i
    groups: dict[int, list[Use]] = {}
    for i, use in enumerate(uses):
        groups.setdefault(root(i), []).append(use)
    return [g for g in groups.values() if len(g) > 1]


def merge_shared_uses(model: nn.Module, graph: fx.Graph, uses: list[Use], input_dependent: set[fx.Node],
                      produces_constant) -> list[Use]:
    """``uses`` with each group of uses sharing parameters replaced by one region rule (module docstring);
    ``NfmError`` naming the uses when a region has another way out."""
    nodes = {n.name: n for n in graph.nodes}
    merged = []
    for group in _groups(uses):
        merged.append((group, _region_use(model, nodes, group, input_dependent, produces_constant)))
    if not merged:
        return uses
    dropped = {id(u) for group, _ in merged for u in group}
    out = [u for u in uses if id(u) not in dropped]
    order = {n: i for i, n in enumerate(nodes)}
    return sorted(out + [m for _, m in merged], key=lambda u: order[u.node])


def _refuse(group: list[Use], why: str):
    first, later = group[0], group[-1]
    shared = sorted(set(first.params.values()) & set().union(*(set(u.params.values()) for u in group[1:])))
    return unsupported(later.path, later.owner, f"uses parameter {shared[0]!r} already used by {first.operation} at "
                                                f"{first.path!r} (shared weights) and {why}")


def _region_use(model: nn.Module, nodes: dict[str, fx.Node], group: list[Use], input_dependent: set[fx.Node],
                produces_constant) -> Use:
    """The merged use of ``group``: a per-sample rule of the region from its uses to the last one."""
    starts = [nodes[u.node] for u in group]
    last = max(starts, key=lambda n: list(nodes.values()).index(n))
    downstream: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n not in downstream:
            downstream.add(n)
            stack.extend(n.users)
    upstream: set[fx.Node] = set()
    stack = [last]
    while stack:
        n = stack.pop()
        if n not in upstream:
            upstream.add(n)
            stack.extend(n.all_input_nodes)
    region = downstream & upstream
    if not all(s in region for s in starts):
        raise _refuse(group, f"one of them does not reach the last one, {last.name} (their contributions reach "
                             "the logits separately)")
    for n in region - {last}:
        leaks = [u for u in n.users if u not in region and not produces_constant(u)]
        if leaks:
            raise _refuse(group, f"the value {n.name} between them also feeds {leaks[0].name} outside them")
    return _merged(model, group, last, region, input_dependent)


def _merged(model: nn.Module, group: list[Use], last: fx.Node, region: set[fx.Node],
            input_dependent: set[fx.Node]) -> Use:
    names = sorted(set().union(*(set(u.params.values()) for u in group)))
    path, owner = where(last, model)
    seeds, make = recomputed_rule(model, last, lambda n: n not in region and n in input_dependent, names)
    modules = {id(u.module) for u in group}
    if len(modules) == 1 and group[0].module is not None:
        operation = f"{group[0].operation} called more than once per forward pass (shared parameters)"
    else:
        operation = " + ".join(dict.fromkeys(u.operation for u in group)) + " (shared parameters)"
    return Use(last.name, path, owner, operation, {n: n for n in names}, make, seeds=[s.name for s in seeds])


__all__ = ["merge_shared_uses"]
