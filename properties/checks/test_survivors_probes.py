"""probes.graph_calls on graphs dynamo captured, for module paths that end in a quote or a bracket (a module held in
a plain dict) and names that end in a letter the path's punctuation is stripped of. Written for mutants that survived
the mutation run over the verdict, message and write modules."""

from __future__ import annotations

import pytest
import torch

from verify.checks.probes import count_calls, graph_calls


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_qkvX = torch.nn.Linear(4, 4)
        self.held = {"to_qkv": torch.nn.Linear(4, 4)}  # a plain dict: its path ends in "['to_qkv']"

    def forward(self, x):
        return self.held["to_qkv"](self.to_qkvX(self.to_qkvX(x)))


def _graphs(module: torch.nn.Module, *args) -> list[torch.fx.GraphModule]:
    graphs = []
    torch.compile(module, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(*args)
    return graphs


def test_calls_are_counted_whatever_the_path_ends_with():
    (graph,) = _graphs(_Net(), torch.randn(2, 4))
    assert graph_calls(graph, ("to_qkvX",)) == 2
    assert graph_calls(graph, ("to_qkv",)) == 1


class _Weight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4, 4))

    def forward(self):
        return self.weight


class _ReadsItsProjection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_qkv = _Weight()

    def forward(self, x):
        return x @ self.to_qkv()


@pytest.mark.xfail(strict=True, reason="graph_calls skips placeholders: a call whose only trace in the graph is the "
                                       "parameter it lifted (a module that returns its weight) counts 0 compiled, "
                                       "1 in eager (count_calls)")
def test_a_call_that_leaves_only_a_placeholder_counts_as_in_eager():
    module, x = _ReadsItsProjection(), torch.randn(2, 4)
    with count_calls(module, ("to_qkv",)) as calls:
        module(x)
    assert sum(calls.values()) == 1
    (graph,) = _graphs(_ReadsItsProjection(), x)
    assert graph_calls(graph, ("to_qkv",)) == 1
