"""Pass registry and manager: duplicate names, error naming, cleanup only after a change."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

from graphopt.errors import GraphoptError, OptionError, PassFailedError, PassInputError
from graphopt.ir import graph as ir
from graphopt.passes import PREPASSES, Pass, PassContext, PassManager, PassResult, get_pass, names, register
from tests.conftest import tiny


class _Broken(Pass):
    name = "test_broken"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise KeyError("no such tensor")


class _BadInput(Pass):
    name = "test_bad_input"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise OptionError("target out of range")


class _Orphan(Pass):
    """Disconnects the Neg node's consumer edge, leaving Neg dangling, and reports `modified`."""

    name = "test_orphan"

    def __init__(self, modified: bool) -> None:
        self.modified = modified

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        relu = next(n for n in graph.nodes if n.op == "Relu")
        relu.inputs[0] = graph.inputs[0]
        return PassResult(modified=self.modified)


def _model():
    return tiny("n = Neg (x)\n y = Relu (n)", inputs="float[N, 3] x", outputs="float[N, 3] y")


def test_registry_lists_prepasses_and_refuses_duplicates():
    assert set(PREPASSES) <= set(names("prepass"))
    with pytest.raises(ValueError, match="dead_code"):
        @register
        class Duplicate(Pass):
            name = "dead_code"
    assert get_pass("dead_code").__class__.__name__ == "DeadCode"


def test_unknown_pass_is_bad_input():
    with pytest.raises(OptionError, match="unknown pass 'nope'"):
        get_pass("nope")


def test_internal_failure_names_the_pass_and_those_before_it():
    model = _model()
    manager = PassManager([get_pass("remove_identity"), get_pass("dead_code"), _Broken()])
    with pytest.raises(PassFailedError) as info:
        manager.run(ir.import_graph(model), PassContext(template=model, progress=False))
    message = str(info.value)
    assert "'test_broken'" in message and "after: remove_identity, dead_code" in message and "KeyError" in message
    assert not isinstance(info.value, GraphoptError)


def test_bad_input_in_a_pass_stays_a_graphopt_error():
    model = _model()
    with pytest.raises(PassInputError, match="pass 'test_bad_input' \\(after: none\\): target out of range"):
        PassManager([_BadInput()]).run(ir.import_graph(model), PassContext(template=model, progress=False))


@pytest.mark.parametrize("modified,nodes", [(True, ["Relu"]), (False, ["Neg", "Relu"])])
def test_cleanup_runs_only_after_a_change(modified, nodes):
    model = _model()
    graph = ir.import_graph(model)
    records = PassManager([_Orphan(modified)]).run(graph, PassContext(template=model, progress=False))
    assert [n.op for n in graph.nodes] == nodes
    assert records[0].to_json() == {"pass": "test_orphan", "modified": modified, "stats": {}, "skipped": []}
