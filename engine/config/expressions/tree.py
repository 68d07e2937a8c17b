"""The typed tree of a rule expression: the nodes the checker builds and the column code runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Node:
    """One node of the typed tree: kind + result type + its source text and offset."""

    kind: str  # const, name, neg, arith, compare, bool, not, isnull, in, call
    type: str
    text: str
    offset: int
    args: list[Node] = field(default_factory=list)
    op: Any = None  # constant value, column name, operator symbol or function name
    extra: Any = None  # list values for `in`, digits for round()
    shared: bool = False  # the middle of a chained comparison: evaluated once, used twice


EXPLAINED = {"name", "call", "compare", "bool", "not", "isnull", "in"}   # nodes whose value an explanation shows


def post_order(root: Node) -> list[Node]:
    """Every node of the tree, children before their parent."""
    order: list[Node] = []

    def walk(node: Node) -> None:
        for child in node.args:
            walk(child)
        order.append(node)

    walk(root)
    return order
