"""Pass registry and manager: duplicate names, error naming, cleanup only after a change, pass contracts."""

from __future__ import annotations

import json

import onnx_graphsurgeon as gs
import pytest

from graphopt.errors import GraphoptError, OptionError, PassFailedError, PassInputError
from graphopt.ir import graph as ir
from graphopt.passes import (PREPASSES, Pass, PassContext, PassManager, PassResult, get_pass, names,
                             normalising_passes, register)
from graphopt.passes.base import PROPERTIES, REGISTRY, all_but
from tests.conftest import init, tiny, weights


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


# -- the pass contract ----------------------------------------------------------------------------

class _NeedsShapes(Pass):
    name = "test_needs_shapes"
    requires = frozenset({"shapes_inferred"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return PassResult(modified=False, stats={"ran": 1})


class _Rewrite(Pass):
    """Claims a change that keeps everything but the shapes (as the pruning methods declare)."""

    name = "test_rewrite"
    preserves = all_but("shapes_inferred")

    def __init__(self, modified: bool = True) -> None:
        self.modified = modified

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return PassResult(modified=self.modified)


def _run(passes: list[Pass], model=None, **manager: object):
    model = model if model is not None else _model()
    return PassManager(passes, **manager).run(ir.import_graph(model), PassContext(template=model, progress=False))


def test_a_requirement_nobody_ensured_is_refused_naming_pass_and_property():
    with pytest.raises(PassFailedError) as info:
        _run([_NeedsShapes()], assume=())
    message = str(info.value)
    assert "pass 'test_needs_shapes' requires shapes_inferred" in message
    assert "no earlier pass ensured it; run shape_inference before it" in message
    assert not isinstance(info.value, GraphoptError)  # an ordering bug, not bad input
    # in a sequence that does establish it, a pass ordered before its ensurer is refused too
    with pytest.raises(PassFailedError, match="'test_needs_shapes' requires shapes_inferred.*before it"):
        _run([_NeedsShapes(), get_pass("shape_inference")])
    assert _run([get_pass("shape_inference"), _NeedsShapes()], assume=())[-1].result.stats == {"ran": 1}


def test_a_change_invalidates_shapes_until_shape_inference_runs_again():
    with pytest.raises(PassFailedError) as info:
        _run([get_pass("shape_inference"), _Rewrite(), _NeedsShapes()])
    assert "'test_rewrite' changed the graph without preserving it; run shape_inference after it" in str(info.value)
    assert "(after: shape_inference, test_rewrite)" in str(info.value)
    records = _run([get_pass("shape_inference"), _Rewrite(), get_pass("shape_inference"), _NeedsShapes()])
    assert [r.name for r in records][-1] == "test_needs_shapes"
    # nothing changed, nothing invalidated
    assert _run([get_pass("shape_inference"), _Rewrite(modified=False), _NeedsShapes()])[-1].result.stats == {"ran": 1}


def test_a_graph_taken_as_given_when_the_sequence_does_not_establish_the_property():
    """A pass run alone on a graph its caller prepared (as the tests of each pass do)."""
    assert _run([_NeedsShapes()])[0].result.stats == {"ran": 1}
    with pytest.raises(PassFailedError, match="'test_rewrite' changed the graph"):
        _run([_Rewrite(), _NeedsShapes()])  # still invalidated by a change


def _conv_model():
    body = "[c1] h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)\n[r] a = Relu (h)\n[c2] y = Conv (a, w2)"
    inits = ", ".join([init("w1", weights(6, 3, 3, 3)), init("b1", weights(6, seed=1)),
                       init("w2", weights(4, 6, 1, 1, seed=2))])
    return tiny(body, inits=inits)


def _pruning(model) -> PassContext:
    return PassContext(template=model, progress=False, input_shapes={"x": (1, 3, 8, 8)}, options={"target_macs": 0.6})


@pytest.mark.parametrize("assume", [None, ()])
def test_methods_after_the_normalising_passes_satisfy_their_contracts(assume):
    model = _conv_model()
    passes = [*normalising_passes(), get_pass("magnitude"), get_pass("shape_inference"), get_pass("magnitude")]
    records = PassManager(passes, assume=assume).run(ir.import_graph(model), _pruning(model))
    assert [r.name for r in records] == [*PREPASSES, "magnitude", "shape_inference", "magnitude"]
    assert records[-3].result.modified
    entry = json.loads(json.dumps(records[-3].to_json()))
    assert entry["requires"] == ["batchnorm_folded", "constants_normalised", "shapes_inferred"]
    assert "ensures" not in entry and entry["history"][0]["by"] == "magnitude"
    assert records[0].to_json()["ensures"] == ["constants_normalised"]


def test_a_second_method_without_shape_inference_between_is_refused():
    model = _conv_model()
    passes = [*normalising_passes(), get_pass("magnitude"), get_pass("magnitude")]
    with pytest.raises(PassFailedError, match="pass 'magnitude' requires shapes_inferred.*'magnitude' changed"):
        PassManager(passes).run(ir.import_graph(model), _pruning(model))


class _Claims(Pass):
    """Stands for a registered pass with its declarations, and reports a change every time (the worst case)."""

    def __init__(self, real: type[Pass]) -> None:
        self.name, self.requires, self.ensures, self.preserves = real.name, real.requires, real.ensures, real.preserves

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return PassResult(modified=True)


@pytest.mark.parametrize("method", names("method"))
def test_the_sequences_the_api_builds_hold_whatever_each_pass_changes(method):
    """optimize: the pre-passes, then the methods with shape inference between; calibrate and inspect:
    the pre-passes. Every requirement holds even if every pass changes the graph."""
    sequence = [*PREPASSES, method]
    for name in [method, *names("method")]:  # a pipeline: shape inference between methods, as optimize builds it
        sequence += ["shape_inference", name]
    _run([_Claims(REGISTRY[name]) for name in sequence], assume=())
    _run([_Claims(REGISTRY[name]) for name in PREPASSES], assume=())


def test_declarations_use_the_vocabulary_and_unknown_names_are_refused():
    for cls in REGISTRY.values():
        assert (cls.requires | cls.ensures | cls.preserves) <= set(PROPERTIES), cls.name
    assert {p for name in PREPASSES for p in REGISTRY[name].ensures} == set(PROPERTIES)
    with pytest.raises(ValueError, match="unknown properties \\['shapes_infered'\\]"):
        @register
        class Misspelt(Pass):
            name = "test_misspelt"
            requires = frozenset({"shapes_infered"})
    assert "test_misspelt" not in REGISTRY
    with pytest.raises(ValueError, match="unknown properties assumed"):
        PassManager([], assume=("weights_sorted",))
