"""select_through_concat: a Gather or Slice picking from one input of a Concat reads that input, exactly; the
Concat goes when nothing else reads it; picks that span two inputs, non-constant indices and stepped slices
stay. On a stacked LSTM read at h[-1] (torch's exports) each layer's hidden units become a group of their own."""

from __future__ import annotations

import pytest

import graphopt
from tests.conftest import assert_equivalent, init, op_types, random_inputs, run_passes, tiny, weights

PIECES = """a = MatMul (x, wa)
            b = MatMul (x, wb)
            c = MatMul (x, wc)
            ua = Unsqueeze (a, zero)
            ub = Unsqueeze (b, zero)
            uc = Unsqueeze (c, zero)
            s = Concat <axis = 0> (ua, ub, uc)"""
INITS = ", ".join([init("wa", weights(4, 3, seed=1)), init("wb", weights(4, 3, seed=2)),
                   init("wc", weights(4, 3, seed=3)), init("zero", [0], "int64")])


def _model(pick: str, outputs: str, extra_inits: str = "") -> object:
    return tiny(f"{PIECES}\n{pick}", inputs="float[N, 4] x", outputs=outputs,
                inits=", ".join(filter(None, [INITS, extra_inits])))


def _resolved(model: object) -> tuple[object, int]:
    rewritten, records = run_passes(model, "shape_inference", "select_through_concat")
    return rewritten, records[-1].result.stats["resolved"]


@pytest.mark.parametrize("index", [-1, 2, 0])
def test_a_gathered_layer_is_read_directly_and_the_concat_goes(index: int) -> None:
    model = _model("y = Gather <axis = 0> (s, i)", "float[N, 3] y", init("i", [index], "int64").replace("[1]", ""))
    rewritten, resolved = _resolved(model)
    assert resolved == 1 and "Concat" not in op_types(rewritten)
    assert_equivalent(model, rewritten, random_inputs(model, batch=3))


def test_a_slice_inside_one_piece_is_read_from_it_and_one_across_two_stays() -> None:
    inits = ", ".join([init("one", [1], "int64"), init("two", [2], "int64"), init("end", [3], "int64"),
                       init("neg", [-1], "int64"), init("big", [9], "int64")])
    model = _model("""inside = Slice (s, one, two, zero)
                      last = Slice (s, neg, big, zero)
                      across = Slice (s, one, end, zero)
                      y = Concat <axis = 0> (inside, last, across)""", "float[4, N, 3] y", inits)
    rewritten, resolved = _resolved(model)
    assert resolved == 2 and op_types(rewritten).count("Concat") == 2  # the one `across` reads stays
    assert_equivalent(model, rewritten, random_inputs(model, batch=3))


def test_a_computed_index_and_a_stepped_slice_stay() -> None:
    model = _model("""n = Shape <start = 0, end = 1> (s)
                      k = Sub (n, one)
                      g = Gather <axis = 0> (s, k)
                      t = Slice (s, zero, end, zero, two)
                      y = Add (g, t)""", "float[2, N, 3] y",
                   ", ".join([init("one", [1], "int64"), init("two", [2], "int64"), init("end", [3], "int64")]))
    rewritten, resolved = _resolved(model)
    assert resolved == 0 and op_types(rewritten) == op_types(model)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_the_layers_of_a_stacked_lstm_read_at_its_last_hidden_state_prune_apart(exporter: str, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from graphopt.torch.export import export_onnx

    class Encoder(torch.nn.Module):  # a speaker encoder's shape: the last layer's final state, projected
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(6, 16, 3, batch_first=True)
            self.linear = torch.nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(x)
            return self.linear(hidden[-1])

    torch.manual_seed(0)
    path = export_onnx(Encoder().eval(), torch.randn(2, 7, 6), tmp_path / "encoder.onnx", exporter=exporter)
    calib = {"input": torch.randn(64, 7, 6).numpy()}
    result = graphopt.optimize(path, method="snp", target_macs=0.6, calib=calib)
    passes = {entry["pass"]: entry for entry in result.report["passes"]}
    assert passes["select_through_concat"]["stats"]["resolved"] == 1
    kept = sorted(entry["kept"] for entry in passes["snp"]["history"])
    assert len(kept) == 3 and len(set(kept)) > 1  # one group per layer, cut where each costs least
