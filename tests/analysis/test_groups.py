"""Channel groups on hand-written graphs, one rule family at a time, and what pruning does to them.

Every case checks the groups `graphopt inspect --groups` reports (sizes, members, prunable or the
blocking reason), then prunes with `magnitude` and checks the result passes the checker by path and
runs with the original's output names, dtypes and shapes. Index-remapping rules (Concat offsets,
Split, Slice, Flatten -> Gemm, attention heads, depthwise, SE gates) are also checked for exactness:
channels planted identically zero in every producer of their group are exactly the ones removed at
the matching MAC target, so the outputs do not change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from graphopt import cli
from graphopt.inspect import channel_groups
from graphopt.ir.shapes import resolve_input_shapes
from tests.conftest import assert_equivalent, init, random_inputs, run_ort, tiny, weights

PADS = "<pads = [1, 1, 1, 1]>"
IMAGE = "float[N, 3, 8, 8] x"


def conv_w(cout: int, cin: int, k: int = 3, seed: int = 0, zero: tuple[int, ...] = ()) -> np.ndarray:
    values = weights(cout, cin, k, k, seed=seed)
    values[list(zero)] = 0.0
    return values


def bias(size: int, seed: int = 1, zero: tuple[int, ...] = ()) -> np.ndarray:
    values = weights(size, seed=seed)
    values[list(zero)] = 0.0
    return values


def build(body: str, params: dict[str, np.ndarray], *, inputs: str = IMAGE, outputs: str = "float[N, 4, 8, 8] y",
          opset: int = 17, extra_inits: str = "") -> onnx.ModelProto:
    """A model from node lines and named float parameters (plus raw initializer text)."""
    inits = ", ".join([*(init(name, value) for name, value in params.items()), *filter(None, [extra_inits])])
    return tiny(body, inputs=inputs, outputs=outputs, inits=inits, opset=opset)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def groups_of(model: onnx.ModelProto) -> list[dict[str, Any]]:
    return channel_groups(model, resolve_input_shapes(model))


def group_with(groups: list[dict[str, Any]], member: str) -> dict[str, Any]:
    found = [g for g in groups if member in g["members"]]
    assert len(found) == 1, f"{member} in {len(found)} groups: {groups}"
    return found[0]


def conv_macs(pixels: int, cin: int, cout: int, k: int = 3) -> int:
    return pixels * cin * cout * k * k


def prune(model: onnx.ModelProto, target: float, tmp_path: Path, method: str = "magnitude",
          **options: Any) -> tuple[onnx.ModelProto, dict[str, Any], dict[str, Any]]:
    """Prune through the API with exact channel counts (round_to 1: the expected counts below are exact),
    check the saved file by path; (model, report, method pass record)."""
    source = save(model, tmp_path / "source.onnx")
    output = tmp_path / "pruned.onnx"
    result = graphopt.optimize(source, method=method, target_macs=target, output=output,
                               **{"round_to": 1, **options})
    onnx.checker.check_model(str(output), full_check=True)
    return onnx.load(str(output)), result.report, result.report["passes"][-1]


def assert_same_interface(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    feeds = random_inputs(reference, batch=3)
    expected, actual = run_ort(reference, feeds), run_ort(candidate, feeds)
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert (actual[name].dtype, actual[name].shape) == (value.dtype, value.shape), name


def weight_of(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    initializers = {t.name: t for t in model.graph.initializer}
    return numpy_helper.to_array(initializers[node.input[index]])


def assert_exact_prune(model: onnx.ModelProto, macs_before: int, macs_after: int, tmp_path: Path) -> onnx.ModelProto:
    """Magnitude at the MAC target of removing exactly the planted zero channels keeps outputs."""
    pruned, report, record = prune(model, macs_after / macs_before + 1e-9, tmp_path)
    assert report["macs_before"] == macs_before
    assert report["macs_after"] == macs_after
    assert record["modified"]
    assert_equivalent(model, pruned, random_inputs(model, batch=3))
    return pruned


# -- index remapping ------------------------------------------------------------------------------

def test_concat_offsets_map_each_segment_to_its_producer(tmp_path: Path) -> None:
    model = build("""
        [a] a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        [ra] r = Relu (a)
        [b] b = Conv <pads = [1, 1, 1, 1]> (x, wb, bb)
        [cat] c = Concat <axis = 1> (r, b)
        [c] y = Conv (c, wc, bc)
    """, {"wa": conv_w(4, 3, zero=(1,)), "ba": bias(4, zero=(1,)), "wb": conv_w(6, 3, seed=2, zero=(0, 4)),
          "bb": bias(6, seed=3, zero=(0, 4)), "wc": conv_w(5, 10, 1, seed=4), "bc": bias(5, seed=5)},
        outputs="float[N, 5, 8, 8] y")
    groups = groups_of(model)
    first, second = group_with(groups, "a:producer"), group_with(groups, "b:producer")
    assert (first["size"], second["size"]) == (4, 6) and first["prunable"] and second["prunable"]
    assert set(first["members"]) == {"a:producer", "a:param", "c:consumer"}
    assert set(second["members"]) == {"b:producer", "b:param", "c:consumer"}
    output_group = group_with(groups, "c:producer")
    assert not output_group["prunable"] and output_group["reason"] == "graph output 'y'"

    before = conv_macs(64, 3, 4) + conv_macs(64, 3, 6) + conv_macs(64, 10, 5, 1)
    after = conv_macs(64, 3, 3) + conv_macs(64, 3, 4) + conv_macs(64, 7, 5, 1)
    pruned = assert_exact_prune(model, before, after, tmp_path)
    consumer = weight_of(pruned, "c")
    expected = np.delete(weight_of(model, "c"), [1, 4 + 0, 4 + 4], axis=1)  # B's channels sit after A's 4
    np.testing.assert_array_equal(consumer, expected)


SPLITS = [  # (id, opset, split line, sizes)
    ("input_opset13", 13, "s0, s1 = Split <axis = 1> (r, sizes)", (3, 5)),
    ("attribute_opset11", 11, "s0, s1 = Split <axis = 1, split = [3, 5]> (r)", (3, 5)),
    ("num_outputs_opset18", 18, "s0, s1 = Split <axis = 1, num_outputs = 2> (r)", (4, 4)),
]


@pytest.mark.parametrize("opset,line,sizes", [c[1:] for c in SPLITS], ids=[c[0] for c in SPLITS])
def test_split_cuts_the_producer_into_one_group_per_piece(opset: int, line: str, sizes: tuple[int, int],
                                                           tmp_path: Path) -> None:
    first, second = sizes
    model = build(f"""
        [a] a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        [ra] r = Relu (a)
        [split] {line}
        [b] b = Conv (s0, wb, bb)
        [c] c = Conv (s1, wc, bc)
        [sum] y = Add (b, c)
    """, {"wa": conv_w(8, 3, zero=(1, 6)), "ba": bias(8, zero=(1, 6)), "wb": conv_w(4, first, 1, seed=2),
          "bb": bias(4, seed=3), "wc": conv_w(4, second, 1, seed=4), "bc": bias(4, seed=5)},
        opset=opset, extra_inits="int64[2] sizes = {3, 5}" if "sizes" in line else "")
    groups = groups_of(model)
    head, tail = group_with(groups, "b:consumer"), group_with(groups, "c:consumer")
    assert (head["size"], tail["size"]) == sizes and head["prunable"] and tail["prunable"]
    assert {"a:producer", "split:split"} <= set(head["members"]) & set(tail["members"])
    merged = group_with(groups, "b:producer")
    assert "c:producer" in merged["members"] and merged["reason"] == "graph output 'y'"

    before = conv_macs(64, 3, 8) + conv_macs(64, 8, 4, 1)
    after = conv_macs(64, 3, 6) + conv_macs(64, 6, 4, 1)
    pruned = assert_exact_prune(model, before, after, tmp_path)
    split_node = next(n for n in pruned.graph.node if n.op_type == "Split")
    if opset >= 13:
        initializers = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
        assert initializers[split_node.input[1]].tolist() == [first - 1, second - 1]
        assert not [a for a in split_node.attribute if a.name == "num_outputs"]
    else:
        assert [list(a.ints) for a in split_node.attribute if a.name == "split"] == [[first - 1, second - 1]]


@pytest.mark.parametrize("starts,ends", [(2, 6), (-6, -2)], ids=["positive", "negative"])
def test_slice_on_channels_keeps_bounds_on_the_kept_channels(starts: int, ends: int, tmp_path: Path) -> None:
    model = build("""
        [a] a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        [sl] s = Slice (a, starts, ends, axes)
        [b] y = Conv (s, wb, bb)
    """, {"wa": conv_w(8, 3, zero=(3, 7)), "ba": bias(8, zero=(3, 7)), "wb": conv_w(4, 4, 1, seed=2),
          "bb": bias(4, seed=3)},
        extra_inits=f"int64[1] starts = {{{starts}}}, int64[1] ends = {{{ends}}}, int64[1] axes = {{1}}")
    groups = groups_of(model)
    inside = group_with(groups, "b:consumer")
    assert inside["size"] == 4 and inside["prunable"] and {"a:producer", "sl:slice"} <= set(inside["members"])
    pieces = sorted(g["size"] for g in groups if "a:producer" in g["members"])
    assert pieces == [2, 2, 4]  # [0:2] and [6:8] are cut off by the Slice, [2:6] flows on

    before = conv_macs(64, 3, 8) + conv_macs(64, 4, 4, 1)
    after = conv_macs(64, 3, 6) + conv_macs(64, 3, 4, 1)
    pruned = assert_exact_prune(model, before, after, tmp_path)
    node = next(n for n in pruned.graph.node if n.op_type == "Slice")
    initializers = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    kept = 6  # of 8 channels, the Slice now selects 3 (positions 2, 4, 5 of the kept ones)
    start, end = (int(initializers[node.input[i]][0]) for i in (1, 2))
    assert len(range(kept)[start:end]) == 3


@pytest.mark.parametrize("flatten,extra", [
    ("[flat] f = Flatten <axis = 1> (r)", ""),
    ("[flat] f = Reshape (r, shape)", "int64[2] shape = {0, 64}"),
    ("[flat] f = Reshape (r, shape)", "int64[2] shape = {0, -1}"),
], ids=["flatten", "reshape_explicit", "reshape_minus_one"])
def test_flatten_to_gemm_maps_each_channel_to_a_block_of_features(flatten: str, extra: str, tmp_path: Path) -> None:
    model = build(f"""
        [a] a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        [ra] r = Relu (a)
        {flatten}
        [fc] y = Gemm <transB = 1> (f, wf, bf)
    """, {"wa": conv_w(4, 3, zero=(2,)), "ba": bias(4, zero=(2,)), "wf": weights(5, 64, seed=2),
          "bf": bias(5, seed=3)}, inputs="float[N, 3, 4, 4] x", outputs="float[N, 5] y", extra_inits=extra)
    group = group_with(groups_of(model), "fc:consumer")
    assert group["size"] == 4 and group["prunable"] and "a:producer" in group["members"]
    explicit = extra.endswith("{0, 64}")
    assert ("flat:shape" in group["members"]) == explicit

    pruned = assert_exact_prune(model, conv_macs(16, 3, 4) + 64 * 5, conv_macs(16, 3, 3) + 48 * 5, tmp_path)
    np.testing.assert_array_equal(weight_of(pruned, "fc"), np.delete(weight_of(model, "fc"), range(32, 48), axis=1))
    if explicit:
        assert weight_of(pruned, "flat").tolist() == [0, 48]


ATTENTION = """
    [q] q = MatMul (x, wq)
    [qr] qh = Reshape (q, heads)
    [qt] qt = Transpose <perm = [0, 2, 1, 3]> (qh)
    [k] k = MatMul (x, wk)
    [kr] kh = Reshape (k, heads)
    [kt] kt = Transpose <perm = [0, 2, 3, 1]> (kh)
    [v] v = MatMul (x, wv)
    [vr] vh = Reshape (v, heads)
    [vt] vt = Transpose <perm = [0, 2, 1, 3]> (vh)
    [scores] s = MatMul (qt, kt)
    [scale] d = Div (s, root)
    [softmax] p = Softmax <axis = -1> (d)
    [context] c = MatMul (p, vt)
    [ct] cm = Transpose <perm = [0, 2, 1, 3]> (c)
    [cr] cf = Reshape (cm, merged)
    [o] y = MatMul (cf, wo)
"""


def test_attention_heads_couple_query_and_key_per_head_dim(tmp_path: Path) -> None:
    def projection(seed: int, zero: tuple[int, ...]) -> np.ndarray:
        values = weights(8, 8, seed=seed)
        values[:, list(zero)] = 0.0
        return values

    # head_dim index 1 is zero in every head of q and k; index 2 in every head of v
    model = build(ATTENTION, {"wq": projection(1, (1, 5)), "wk": projection(2, (1, 5)), "wv": projection(3, (2, 6)),
                              "wo": weights(8, 8, seed=4), "root": np.array([2.0], dtype=np.float32)},
                  inputs="float[N, 4, 8] x", outputs="float[N, 4, 8] y",
                  extra_inits="int64[4] heads = {0, 0, 2, 4}, int64[3] merged = {0, 0, 8}")
    groups = groups_of(model)
    query_key = group_with(groups, "q:producer")
    assert query_key["size"] == 4 and query_key["prunable"]  # head_dim, the same indices in both heads
    assert {"k:producer", "qr:shape", "kr:shape"} <= set(query_key["members"])
    value = group_with(groups, "v:producer")
    assert value["size"] == 4 and value["prunable"] and {"o:consumer", "vr:shape", "cr:shape"} <= set(value["members"])
    assert not group_with(groups, "o:producer")["prunable"]

    before = 4 * 256 + 2 * 128  # four projections, then scores and context (2 heads x 4 x 4 x 4)
    after = 4 * 192 + 2 * 96
    pruned = assert_exact_prune(model, before, after, tmp_path)
    assert weight_of(pruned, "qr").tolist() == [0, 0, 2, 3]
    assert weight_of(pruned, "cr").tolist() == [0, 0, 6]


def test_depthwise_conv_couples_its_input_and_output_channels(tmp_path: Path) -> None:
    model = build("""
        [a] a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        [ra] r = Relu (a)
        [dw] d = Conv <group = 6, pads = [1, 1, 1, 1]> (r, wd, bd)
        [rd] e = Relu (d)
        [b] y = Conv (e, wb, bb)
    """, {"wa": conv_w(6, 3, zero=(2,)), "ba": bias(6, zero=(2,)), "wd": conv_w(6, 1, seed=2),
          "bd": bias(6, seed=3, zero=(2,)), "wb": conv_w(4, 6, 1, seed=4), "bb": bias(4, seed=5)})
    group = group_with(groups_of(model), "a:producer")
    assert group["size"] == 6 and group["prunable"]
    assert set(group["members"]) == {"a:producer", "a:param", "dw:param", "dw:group", "b:consumer"}

    before = conv_macs(64, 3, 6) + 64 * 6 * 9 + conv_macs(64, 6, 4, 1)
    after = conv_macs(64, 3, 5) + 64 * 5 * 9 + conv_macs(64, 5, 4, 1)
    pruned = assert_exact_prune(model, before, after, tmp_path)
    depthwise = next(n for n in pruned.graph.node if n.name == "dw")
    assert onnx.helper.get_attribute_value(next(a for a in depthwise.attribute if a.name == "group")) == 5
    assert weight_of(pruned, "dw").shape == (5, 1, 3, 3)


def test_squeeze_excitation_gate_merges_with_the_gated_tensor(tmp_path: Path) -> None:
    model = build("""
        [a] a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        [ra] r = Relu (a)
        [pool] p = GlobalAveragePool (r)
        [reduce] s = Conv (p, wr, br)
        [rs] t = Relu (s)
        [expand] e = Conv (t, we, be)
        [gate] g = Sigmoid (e)
        [scale] m = Mul (r, g)
        [b] y = Conv (m, wb, bb)
    """, {"wa": conv_w(8, 3, zero=(3,)), "ba": bias(8, zero=(3,)), "wr": conv_w(2, 8, 1, seed=2),
          "br": bias(2, seed=3), "we": conv_w(8, 2, 1, seed=4, zero=(3,)), "be": bias(8, seed=5, zero=(3,)),
          "wb": conv_w(4, 8, 1, seed=6), "bb": bias(4, seed=7)})
    groups = groups_of(model)
    gated = group_with(groups, "a:producer")
    assert gated["size"] == 8 and gated["prunable"]
    assert {"expand:producer", "reduce:consumer", "b:consumer"} <= set(gated["members"])
    squeezed = group_with(groups, "reduce:producer")
    assert squeezed["size"] == 2 and squeezed["prunable"] and "expand:consumer" in squeezed["members"]

    before = conv_macs(64, 3, 8) + 8 * 2 + 2 * 8 + conv_macs(64, 8, 4, 1)
    after = conv_macs(64, 3, 7) + 7 * 2 + 2 * 7 + conv_macs(64, 7, 4, 1)
    assert_exact_prune(model, before, after, tmp_path)


# -- blockers: the group is left alone, with its reason; the prunable stem around it still shrinks ------

STEM = "[stem] s = Conv <pads = [1, 1, 1, 1]> (x, ws, bs)\n[rs] r = Relu (s)\n"
STEM_PARAMS = {"ws": conv_w(6, 3, seed=11), "bs": bias(6, seed=12)}
CONV_A = {"wa": conv_w(4, 6, seed=13), "ba": bias(4, seed=14)}
CONV_B = {"wb": conv_w(4, 4, 1, seed=15), "bb": bias(4, seed=16)}
SEQUENCE = [  # (id, body after the stem, parameters, inputs, outputs, extra initializers, reason fragment)
    ("graph_output", "[a] y = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)", CONV_A, IMAGE, "float[N, 4, 8, 8] y", "",
     "graph output 'y'"),
    ("softmax_over_channels", "[a] a = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)\n[sm] p = Softmax <axis = 1> (a)\n"
     "[b] y = Conv (p, wb, bb)", {**CONV_A, **CONV_B}, IMAGE, "float[N, 4, 8, 8] y", "",
     "sm (Softmax): normalises over the channel axis"),
    ("layernorm_over_channels", "[a] a = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)\n"
     "[tr] t = Transpose <perm = [0, 2, 3, 1]> (a)\n"
     "[ln] n = LayerNormalization <axis = -1> (t, gamma, beta)\n[back] u = Transpose <perm = [0, 3, 1, 2]> (n)\n"
     "[b] y = Conv (u, wb, bb)", {**CONV_A, **CONV_B, "gamma": bias(4, seed=17), "beta": bias(4, seed=18)},
     IMAGE, "float[N, 4, 8, 8] y", "", "ln (LayerNormalization): normalises over the channel axis"),
    ("topk_has_no_rule", "[a] a = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)\n[topk] v, i = TopK <axis = -1> (a, k)\n"
     "[b] y = Conv (v, wb, bb)", {**CONV_A, **CONV_B}, IMAGE, "float[N, 4, 8, 4] y", "int64[1] k = {4}",
     "topk (TopK): no channel rule for this op"),
    ("read_inside_if", "[a] a = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)\n"
     "[mx] top = ReduceMax <keepdims = 0> (x)\n[gt] cond = Greater (top, zero)\n"
     "[branch] o = If (cond) <then_branch = then_g () => (float[N, 4, 8, 8] t) { [t_relu] t = Relu (a) },"
     " else_branch = else_g () => (float[N, 4, 8, 8] e) { [e_neg] e = Neg (a) }>\n[b] y = Conv (o, wb, bb)",
     {**CONV_A, **CONV_B, "zero": np.zeros(1, dtype=np.float32)}, IMAGE, "float[N, 4, 8, 8] y", "",
     "tensor 'a' is read inside a subgraph"),
    ("maxpool_indices_read", "[a] a = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)\n"
     "[mp] p, idx = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)\n[b] y = Conv (p, wb, bb)",
     {**CONV_A, **CONV_B}, IMAGE, "float[N, 4, 4, 4] y, int64[N, 4, 4, 4] idx", "", "mp (MaxPool): a second output (flat indices) is read"),
    ("dropout_mask_output", "[a] a = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)\n[drop] p, mask = Dropout (a)\n"
     "[b] y = Conv (p, wb, bb)", {**CONV_A, **CONV_B}, IMAGE, "float[N, 4, 8, 8] y, bool[N, 4, 8, 8] mask", "",
     "graph output 'mask'"),
    ("matmul_rows", "[a] a = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)\n[rows] m = Reshape (a, shape)\n"
     "[mm] p = MatMul (m, wm)\n[flat] f = Flatten (p)\n[fc] y = Gemm (f, wf)",
     {**CONV_A, "wm": weights(64, 5, seed=20), "wf": weights(20, 3, seed=21)}, IMAGE, "float[N, 3] y",
     "int64[3] shape = {0, 4, 64}", "mm (MatMul): channels on the row axis"),
]


@pytest.mark.parametrize("body,params,inputs,outputs,extra,reason", [c[1:] for c in SEQUENCE],
                         ids=[c[0] for c in SEQUENCE])
def test_blocked_group_is_left_alone_with_its_reason(body: str, params: dict[str, np.ndarray], inputs: str,
                                                     outputs: str, extra: str, reason: str, tmp_path: Path) -> None:
    model = build(STEM + body, {**STEM_PARAMS, **params}, inputs=inputs, outputs=outputs, extra_inits=extra)
    groups = groups_of(model)
    blocked = group_with(groups, "a:producer")
    assert blocked["size"] == 4 and not blocked["prunable"] and blocked["reason"] == reason
    stem = group_with(groups, "stem:producer")
    assert stem["prunable"] and "a:consumer" in stem["members"]

    pruned, _, record = prune(model, 0.5, tmp_path)
    assert record["modified"] and any(reason in line for line in record["skipped"])
    assert weight_of(pruned, "a").shape[0] == 4  # the blocked producer keeps every channel
    assert weight_of(pruned, "stem").shape[0] < 6
    assert_same_interface(model, pruned)


def test_normalisation_over_another_axis_does_not_block() -> None:
    model = build(STEM + "[a] a = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)\n"
                  "[ln] n = LayerNormalization <axis = -1> (a, gamma, beta)\n[sm] p = Softmax <axis = 2> (n)\n"
                  "[b] y = Conv (p, wb, bb)", {**STEM_PARAMS, **CONV_A, **CONV_B, "gamma": bias(8, seed=17),
                                                "beta": bias(8, seed=18)})
    group = group_with(groups_of(model), "a:producer")
    assert group["prunable"] and "b:consumer" in group["members"]


def test_shared_initializer_is_copied_for_the_pruned_user(tmp_path: Path) -> None:
    model = build("""
        [a] a = Conv <pads = [1, 1, 1, 1]> (x, w)
        [ra] r = Relu (a)
        [b] y1 = Conv (r, wb, bb)
        [c] y2 = Conv <pads = [1, 1, 1, 1]> (x, w)
    """, {"w": conv_w(4, 3), "wb": conv_w(4, 4, 1, seed=2), "bb": bias(4, seed=3)},
        outputs="float[N, 4, 8, 8] y1, float[N, 4, 8, 8] y2")
    groups = groups_of(model)
    assert group_with(groups, "a:producer")["prunable"]
    assert group_with(groups, "c:producer")["reason"] == "graph output 'y2'"

    pruned, _, record = prune(model, 0.6, tmp_path)
    assert record["modified"]
    assert weight_of(pruned, "a").shape[0] < 4
    c_node = next(n for n in pruned.graph.node if n.name == "c")
    assert c_node.input[1] == "w"  # the other user keeps the original initializer, untouched
    np.testing.assert_array_equal(weight_of(pruned, "c"), weight_of(model, "c"))
    feeds = random_inputs(model, batch=3)
    np.testing.assert_array_equal(run_ort(pruned, feeds)["y2"], run_ort(model, feeds)["y2"])


def test_inspect_groups_json_lists_what_channel_groups_finds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = build(STEM + SEQUENCE[1][1], {**STEM_PARAMS, **CONV_A, **CONV_B})
    path = save(model, tmp_path / "model.onnx")
    assert cli.main(["inspect", str(path), "--groups", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["groups"]
    assert listed == groups_of(model)
    assert {g["id"] for g in listed if not g["prunable"]} == {group_with(listed, "a:producer")["id"],
                                                              group_with(listed, "b:producer")["id"]}


def test_an_embedding_lookup_writes_a_stream_its_readers_share(tmp_path: Path) -> None:
    # ids -> Gather(table) + a position table -> MatMul: the table's columns, the added positions and the reader's
    # rows are one group; the Gathers of the run-time shape are shape arithmetic and stay out of it
    table, positions = weights(10, 6, seed=1), weights(5, 6, seed=2)
    table[:, 3] = positions[:, 3] = 0.0  # column 3 is zero in both
    model = build("""
        e = Gather(table, ids)
        shape = Shape(ids)
        count = Gather(shape, last)
        ranks = Range(zero, count, one)
        p = Gather(positions, ranks)
        s = Add(e, p)
        y = MatMul(s, w)
    """, {"table": table, "positions": positions, "w": weights(6, 4, seed=3)},
                  inputs="int64[N, 5] ids", outputs="float[N, 5, 4] y",
                  extra_inits="int64 last = {1}, int64 zero = {0}, int64 one = {1}")
    groups = groups_of(model)
    stream = group_with(groups, "Gather_0:producer")  # the position lookup folds into a constant addend
    assert stream["size"] == 6 and stream["prunable"] and {"Add_1:param", "MatMul_2:consumer"} <= set(stream["members"])
    assert len(groups) == 2
    pruned = assert_exact_prune(model, 5 * 6 * 4, 5 * 5 * 4, tmp_path)
    tables = [numpy_helper.to_array(t) for t in pruned.graph.initializer]
    assert {(10, 5), (5, 5), (5, 4)} <= {t.shape for t in tables}
