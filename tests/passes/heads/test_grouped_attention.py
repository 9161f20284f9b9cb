"""onnxruntime's GroupQueryAttention (com.microsoft), as its transformers tools write it for Llama-style decoders:
a unit is one key/value head with its query heads, found behind separate or packed query/key/value
projections, removed exactly where the output projection ignores it, pruned by SNP under one MAC budget with
the mask found through seqlens_k; where a key/value cache is the interface, only query heads go, as many from
every group, and the cache keeps its shape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.api import optimize
from graphopt.calibration.session import make_session
from graphopt.calibration.shapes import batch1_shapes, count_cost
from graphopt.ir import graph as ir
from graphopt.passes.base import PassResult
from graphopt.passes.heads.prune import cut_heads
from graphopt.passes.heads.select import usable_blocks

VOCAB, DIM, HEADS, KV_HEADS, SIZE, FFN, LAYERS, TOKENS = 40, 32, 6, 2, 8, 64, 2, 12
GROUP = HEADS // KV_HEADS
LAYER_WEIGHTS = ("wq", "bq", "wk", "wv", "wo", "bo", "w1", "b1", "w2", "b2", "ng", "nb", "mg", "mb")


def _weights(seed: int, kv_heads: int = KV_HEADS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    found = {"embedding": rng.standard_normal((VOCAB, DIM)).astype(np.float32),
             "final_g": (1.0 + 0.1 * rng.standard_normal(DIM)).astype(np.float32),
             "final_b": (0.1 * rng.standard_normal(DIM)).astype(np.float32),
             "head": (rng.standard_normal((DIM, VOCAB)) / np.sqrt(DIM)).astype(np.float32)}
    for layer in range(LAYERS):
        shapes = {"wq": (DIM, HEADS * SIZE), "bq": (HEADS * SIZE,), "wk": (DIM, kv_heads * SIZE),
                  "wv": (DIM, kv_heads * SIZE), "wo": (HEADS * SIZE, DIM), "bo": (DIM,), "w1": (DIM, FFN),
                  "b1": (FFN,), "w2": (FFN, DIM), "b2": (DIM,)}
        for name, shape in shapes.items():
            scale = 0.02 if name.startswith("b") else 1.0 / np.sqrt(shape[0])
            found[f"{name}{layer}"] = (rng.standard_normal(shape) * scale).astype(np.float32)
        for norm in ("n", "m"):
            found[f"{norm}g{layer}"] = (1.0 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
            found[f"{norm}b{layer}"] = (0.1 * rng.standard_normal(DIM)).astype(np.float32)
    return found


def _model(values: dict[str, np.ndarray], packed: bool = False, cache: bool = False) -> onnx.ModelProto:
    """Token embeddings, then pre-LN blocks (LayerNorm, q/k/v projections or one packed, GroupQueryAttention
    reading the token counts of the attention mask, output projection and residual; LayerNorm, ReLU FFN and
    residual), a final LayerNorm and the logits. `cache`: past key/value inputs and present outputs. The
    key/value heads are as many as `values`' key projection has."""
    kv_heads = values["wk0"].shape[1] // SIZE
    nodes = [helper.make_node("ReduceSum", ["attention_mask", "one"], ["counts"], keepdims=0),
             helper.make_node("Sub", ["counts", "one"], ["last"]),
             helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
             helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
             helper.make_node("Gather", ["mask_shape", "one_scalar"], ["total64"], axis=0),
             helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
             helper.make_node("Gather", ["embedding", "input_ids"], ["x"], axis=0)]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(1, np.int64), "one_scalar"),
             numpy_helper.from_array(values["embedding"], "embedding")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", VOCAB])]
    stream = "x"
    for layer in range(LAYERS):
        w = {k[:-1]: v for k, v in values.items() if k[:-1] in LAYER_WEIGHTS and k.endswith(str(layer))}
        if packed:
            w = {**w, "wqkv": np.concatenate([w["wq"], w["wk"], w["wv"]], axis=1),
                 "bqkv": np.concatenate([w["bq"], np.zeros(2 * kv_heads * SIZE, np.float32)])}
        inits += [numpy_helper.from_array(v, f"{k}{layer}") for k, v in w.items()]
        n = lambda name: f"{name}{layer}"  # noqa: E731
        nodes.append(helper.make_node("LayerNormalization", [stream, n("ng"), n("nb")], [n("h")], axis=-1))
        if packed:
            nodes += [helper.make_node("MatMul", [n("h"), n("wqkv")], [n("qkv_raw")]),
                      helper.make_node("Add", [n("qkv_raw"), n("bqkv")], [n("qkv")])]
            qkv = [n("qkv"), "", ""]
        else:
            nodes += [helper.make_node("MatMul", [n("h"), n("wq")], [n("q_raw")]),
                      helper.make_node("Add", [n("q_raw"), n("bq")], [n("q")]),
                      helper.make_node("MatMul", [n("h"), n("wk")], [n("k")]),
                      helper.make_node("MatMul", [n("h"), n("wv")], [n("v")])]
            qkv = [n("q"), n("k"), n("v")]
        past = [n("past_key"), n("past_value")] if cache else ["", ""]
        nodes += [helper.make_node("GroupQueryAttention", [*qkv, *past, "seqlens_k", "total"],
                                   [n("context"), n("present_key"), n("present_value")], domain="com.microsoft",
                                   num_heads=HEADS, kv_num_heads=kv_heads, name=n("gqa")),
                  helper.make_node("MatMul", [n("context"), n("wo")], [n("o_raw")]),
                  helper.make_node("Add", [n("o_raw"), n("bo")], [n("o")]),
                  helper.make_node("Add", [stream, n("o")], [n("y")]),
                  helper.make_node("LayerNormalization", [n("y"), n("mg"), n("mb")], [n("g")], axis=-1),
                  helper.make_node("MatMul", [n("g"), n("w1")], [n("f_raw")]),
                  helper.make_node("Add", [n("f_raw"), n("b1")], [n("f")]),
                  helper.make_node("Relu", [n("f")], [n("r")]),
                  helper.make_node("MatMul", [n("r"), n("w2")], [n("d_raw")]),
                  helper.make_node("Add", [n("d_raw"), n("b2")], [n("d")]),
                  helper.make_node("Add", [n("y"), n("d")], [n("stream")])]
        if cache:
            cache_shape = ["batch", kv_heads, "past", SIZE]
            inputs += [helper.make_tensor_value_info(n(p), TensorProto.FLOAT, cache_shape)
                       for p in ("past_key", "past_value")]
            outputs += [helper.make_tensor_value_info(n(p), TensorProto.FLOAT, ["batch", kv_heads, "total", SIZE])
                        for p in ("present_key", "present_value")]
        stream = n("stream")
    nodes += [helper.make_node("LayerNormalization", [stream, "final_g", "final_b"], ["final"], axis=-1),
              helper.make_node("MatMul", ["final", "head"], ["out"])]
    inits += [numpy_helper.from_array(values[k], k) for k in ("final_g", "final_b", "head")]
    for index, node in enumerate(nodes):
        node.name = node.name or f"{node.op_type}_{index}"
    graph = helper.make_graph(nodes, "gqa_decoder", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _data(count: int, tokens: int, seed: int, padded: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens // 2, tokens + 1, size=count) if padded else np.full(count, tokens)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(0, VOCAB, size=(count, tokens)).astype(np.int64), "attention_mask": mask}


def _run(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(model).run(["out"], data)[0]


def _usable(model: onnx.ModelProto):
    graph = ir.import_graph(model)
    shapes = batch1_shapes(model, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)})
    result = PassResult(modified=False)
    return graph, shapes, usable_blocks(graph, shapes, result), result


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_a_key_value_head_and_its_query_heads_go_together_exactly(packed) -> None:
    """Three key/value heads of two query heads each (a group does not outnumber the key/value heads): a unit is
    a key/value head with its query heads."""
    values = _weights(0, kv_heads=3)
    silent = {0: 1, 1: 0}  # layer: the key/value head whose query heads the output projection ignores
    for layer, unit in silent.items():
        values[f"wo{layer}"][unit * 2 * SIZE:(unit + 1) * 2 * SIZE] = 0.0
    model = _model(values, packed)
    graph, shapes, blocks, result = _usable(model)
    assert [(b.heads, b.groups) for b in blocks] == [(3, 1)] * LAYERS, result.skipped
    for block, (layer, unit) in zip(blocks, silent.items()):
        projections = {s.node.name for s in block.slices if s.node.op == "MatMul"}
        assert len(projections) == (1 if packed else 3) and len(block.consumers) == 1
        cut_heads(graph, block, np.setdiff1d(np.arange(3), [unit]), {}, shapes, reconstruct=False)
    pruned = ir.export_model(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    attention = [n for n in pruned.graph.node if n.op_type == "GroupQueryAttention"]
    found = [{a.name: a.i for a in n.attribute} for n in attention]
    assert found == [{"num_heads": 4, "kv_num_heads": 2}] * LAYERS
    data = _data(3, TOKENS + 3, seed=1, padded=False)
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-5, atol=1e-5)
    assert count_cost(pruned, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)}).macs < \
        count_cost(model, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)}).macs


def test_the_op_counts_the_macs_of_every_query_head_against_its_keys() -> None:
    model = _model(_weights(0))
    counted = count_cost(model, {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)})
    assert not counted.uncounted
    projections = DIM * (HEADS + 2 * KV_HEADS) * SIZE + HEADS * SIZE * DIM + 2 * DIM * FFN
    scores_and_values = 2 * TOKENS * HEADS * SIZE
    assert counted.macs == LAYERS * TOKENS * (projections + scores_and_values) + TOKENS * DIM * VOCAB


def _cosine_kept(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask != 0], b[mask != 0]
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_snp_prunes_grouped_heads_and_ffn_units_under_one_budget(packed) -> None:
    values = _weights(2, kv_heads=3)
    values["wo0"][4 * SIZE:] *= 1e-3  # layer 0's third key/value head barely reaches the output
    model = _model(values, packed)
    result = optimize(model, method="snp", calib=_data(96, TOKENS, seed=3), target_macs=0.6, round_to=1)
    stats = result.report["passes"][-1]["stats"]
    assert stats["heads_removed"] >= 1 and stats["channels_removed"] >= 1, stats
    assert result.report["macs_ratio"] <= 0.6 + 0.02 and result.report["target_reached"]
    assert result.report["mask_input"]["name"] == "attention_mask"  # found through seqlens_k
    attention = [{a.name: a.i for a in n.attribute} for n in result.model.graph.node
                 if n.op_type == "GroupQueryAttention"]
    assert attention[0] == {"num_heads": 4, "kv_num_heads": 2}
    assert all(a["num_heads"] == 2 * a["kv_num_heads"] for a in attention)
    held_out = _data(16, TOKENS + 4, seed=5)
    assert _cosine_kept(_run(result.model, held_out), _run(model, held_out), held_out["attention_mask"]) > 0.9
    assert [d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim[:2]] == ["batch", "sequence"]


def _cache_feeds(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`data` with an empty key/value cache (no past tokens) for every layer."""
    empty = np.zeros((len(data["input_ids"]), KV_HEADS, 0, SIZE), np.float32)
    return {**data, **{f"past_{kind}{layer}": empty for kind in ("key", "value") for layer in range(LAYERS)}}


def _run_all(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model).run(None, data)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_with_a_key_value_cache_only_query_heads_go_as_many_from_every_group(packed) -> None:
    values = _weights(0)
    silent = {0: [1, 5], 1: [0, 3]}  # layer: a query head of each key/value group the output ignores
    for layer, heads in silent.items():
        for head in heads:
            values[f"wo{layer}"][head * SIZE:(head + 1) * SIZE] = 0.0
    model = _model(values, packed=packed, cache=True)
    graph = ir.import_graph(model)
    shapes = batch1_shapes(model, {k: v.shape for k, v in _cache_feeds(_data(1, TOKENS, 0)).items()})
    result = PassResult(modified=False)
    blocks = usable_blocks(graph, shapes, result)
    assert [(b.heads, b.groups, b.units) for b in blocks] == [(HEADS, KV_HEADS, GROUP)] * LAYERS, result.skipped
    for block, heads in zip(blocks, silent.values()):
        # the query projection's columns (of a packed one, the leading query part): keys and values stay
        assert {s.offset for s in block.slices} == {0} and all(s.width == SIZE for s in block.slices)
        cut_heads(graph, block, np.setdiff1d(np.arange(HEADS), heads), {}, shapes, reconstruct=False)
    pruned = ir.export_model(graph, model)
    attention = [{a.name: a.i for a in n.attribute} for n in pruned.graph.node if n.op_type == "GroupQueryAttention"]
    assert attention == [{"num_heads": HEADS - KV_HEADS, "kv_num_heads": KV_HEADS}] * LAYERS
    assert [o.type for o in pruned.graph.output] == [o.type for o in model.graph.output]  # the cache's shape stays
    data = _cache_feeds(_data(3, TOKENS + 2, seed=1, padded=False))
    for got, want in zip(_run_all(pruned, data), _run_all(model, data)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_snp_spends_query_heads_of_a_cached_model_in_its_budget() -> None:
    values = _weights(4)
    for head in (2, 3):  # one query head of each group barely reaches the output in layer 1
        values["wo1"][head * SIZE:(head + 1) * SIZE] *= 1e-3
    model = _model(values, cache=True)
    calib = _cache_feeds(_data(96, TOKENS, seed=3, padded=False))
    result = optimize(model, method="snp", calib=calib, target_macs=0.7, round_to=1)
    stats = result.report["passes"][-1]["stats"]
    assert stats["heads_removed"] >= KV_HEADS and stats["heads_removed"] % KV_HEADS == 0, stats
    attention = [{a.name: a.i for a in n.attribute} for n in result.model.graph.node
                 if n.op_type == "GroupQueryAttention"]
    assert attention[1]["num_heads"] < HEADS and all(a["kv_num_heads"] == KV_HEADS for a in attention)
    assert result.report["target_reached"] and not result.report["interface_changes"]
    held_out = _cache_feeds(_data(16, TOKENS, seed=5, padded=False))
    got, want = _run_all(result.model, held_out), _run_all(model, held_out)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert _cosine_kept(got[0], want[0], held_out["attention_mask"]) > 0.9


def _torch_decoder(silent: dict[int, list[int]], bias: bool = True):
    """A torch decoder in the Llama layout: 6 query heads over 2 key/value heads, each repeated for its 3 query
    heads by expand + reshape, rotary q/k, causal mask; the output projection ignores the `silent` query heads
    (layer: heads); `bias`: the projections' biases."""
    import math

    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.o = nn.Linear(DIM, HEADS * SIZE, bias=bias), nn.Linear(HEADS * SIZE, DIM, bias=bias)
            self.k, self.v = (nn.Linear(DIM, KV_HEADS * SIZE, bias=bias) for _ in range(2))
            self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.ReLU(), nn.Linear(FFN, DIM))
            self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, tokens, _ = x.shape
            h = self.norm1(x)
            q = self.q(h).view(batch, tokens, HEADS, SIZE).transpose(1, 2)
            k, v = (p(h).view(batch, tokens, KV_HEADS, SIZE).transpose(1, 2) for p in (self.k, self.v))
            angle = torch.arange(tokens, dtype=x.dtype)[:, None] / (10.0 ** (torch.arange(SIZE) / SIZE))
            rotate = lambda t: torch.cat((-t[..., SIZE // 2:], t[..., :SIZE // 2]), -1)  # noqa: E731
            q, k = q * angle.cos() + rotate(q) * angle.sin(), k * angle.cos() + rotate(k) * angle.sin()
            k, v = (t[:, :, None].expand(batch, KV_HEADS, GROUP, tokens, SIZE).reshape(batch, HEADS, tokens, SIZE)
                    for t in (k, v))
            causal = torch.full((tokens, tokens), -1e4).triu(1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(SIZE) + causal
            x = x + self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, HEADS * SIZE))
            return x + self.ffn(self.norm2(x))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.blocks = nn.Embedding(VOCAB, DIM), nn.ModuleList(Block() for _ in range(LAYERS))
            self.head = nn.Linear(DIM, VOCAB)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    torch.manual_seed(0)
    module = Decoder().eval()
    with torch.no_grad():
        for layer, heads in silent.items():
            for head in heads:
                module.blocks[layer].o.weight[:, head * SIZE:(head + 1) * SIZE] = 0.0
    return module


def _torch_export(module, exporter: str, path) -> onnx.ModelProto:
    import torch

    ids = torch.randint(0, VOCAB, (2, TOKENS))
    if exporter == "legacy":
        torch.onnx.export(module, (ids,), str(path), dynamo=False, opset_version=17, input_names=["input_ids"],
                          output_names=["out"], dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}})
    else:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
        torch.onnx.export(module, (ids,), dynamo=True, opset_version=18, verbose=False, input_names=["input_ids"],
                          output_names=["out"], dynamic_shapes=({0: batch, 1: sequence},)).save(str(path))
    return optimize(onnx.load(str(path)), method="none", input_shapes={"sequence": TOKENS}).model


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_torch_export_gives_up_query_heads_as_many_from_every_group(exporter, tmp_path) -> None:
    """Three query heads to a key/value head, two key/value heads: a group outnumbers the key/value heads, so
    the block gives up query heads, one unit being a query head of each group, and keeps both key/value heads
    (graphopt.analysis.heads.grouped); removing query heads the output projection ignores is exact, the
    Expand repeating each key/value head for the kept count of its group."""
    pytest.importorskip("torch")
    silent = {0: [1, 5], 1: [0, 4]}
    model = _torch_export(_torch_decoder(silent), exporter, tmp_path / "m.onnx")
    graph = ir.import_graph(model)
    shapes = batch1_shapes(model, {"input_ids": (1, TOKENS)})
    result = PassResult(modified=False)
    blocks = usable_blocks(graph, shapes, result)
    assert [(b.heads, b.groups, b.units) for b in blocks] == [(HEADS, KV_HEADS, GROUP)] * LAYERS, result.skipped
    for block, heads in zip(blocks, silent.values()):
        assert len({s.node.name for s in block.slices if s.node.op == "MatMul"}) == 1  # the query projection
        cut_heads(graph, block, np.setdiff1d(np.arange(HEADS), heads), {}, shapes, reconstruct=False)
    ir.cleanup(graph)
    pruned = ir.export_model(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    data = {"input_ids": np.random.default_rng(3).integers(0, VOCAB, (3, TOKENS + 5)).astype(np.int64)}
    np.testing.assert_allclose(_run(pruned, data), _run(model, data), rtol=1e-4, atol=1e-4)
    sizes = sorted(tuple(t.dims) for t in pruned.graph.initializer if len(t.dims) == 2 and t.dims[0] == DIM)
    # q keeps 4 heads ([32, 4 x 8]) and o their rows ([4 x 8, 32]); k and v keep their 2 heads ([32, 2 x 8])
    assert sizes.count((DIM, (HEADS - KV_HEADS) * SIZE)) == 2 * LAYERS and (DIM, HEADS * SIZE) not in sizes
    assert sizes.count((DIM, KV_HEADS * SIZE)) == 2 * LAYERS
    snp = optimize(model, method="snp", calib={"input_ids": data["input_ids"][:, :TOKENS].repeat(20, axis=0)},
                   target_macs=0.6, round_to=1)
    assert snp.report["target_reached"] and np.isfinite(_run(snp.model, data)).all()
    removed = snp.report["passes"][-1]["stats"]["heads_removed"]
    assert removed % KV_HEADS == 0 and removed >= KV_HEADS  # the silent heads go, one of each group at a time


def test_a_shift_folded_after_a_bias_free_projection_loses_the_removed_heads_columns(tmp_path) -> None:
    """A channel group's reconstruction folds its constant into a bias-free query projection as an Add after it
    (graphopt.passes.channels.consumer_shift) once the heads were analysed: cutting heads cuts that Add too."""
    pytest.importorskip("torch")
    from graphopt.passes.channels.consumer_shift import add_bias

    silent = {0: [1, 5], 1: [0, 4]}
    model = _torch_export(_torch_decoder(silent, bias=False), "legacy", tmp_path / "m.onnx")
    graph = ir.import_graph(model)
    shapes = batch1_shapes(model, {"input_ids": (1, TOKENS)})
    blocks = usable_blocks(graph, shapes, PassResult(modified=False))
    projections = [next(s.node for s in b.slices if s.node.op == "MatMul") for b in blocks]
    shifts = [np.random.default_rng(layer).standard_normal(HEADS * SIZE) for layer in range(LAYERS)]
    for node, shift in zip(projections, shifts):
        add_bias(graph, node, shift.astype(np.float32))
    shifted = ir.export_model(graph, model)
    for block, heads in zip(blocks, silent.values()):
        cut_heads(graph, block, np.setdiff1d(np.arange(HEADS), heads), {}, shapes, reconstruct=False)
    ir.cleanup(graph)
    pruned = ir.export_model(graph, model)
    data = {"input_ids": np.random.default_rng(3).integers(0, VOCAB, (2, TOKENS + 3)).astype(np.int64)}
    np.testing.assert_allclose(_run(pruned, data), _run(shifted, data), rtol=1e-4, atol=1e-4)


def test_inspect_lists_the_head_blocks_and_their_units(tmp_path, capfd) -> None:
    """`graphopt inspect --groups` says how heads would be cut: query heads by group here (6 over 2), a key/value
    head with its query heads where a group does not outnumber the key/value heads (6 over 3)."""
    from graphopt.cli import main
    from graphopt.inspect import inspect_model

    shapes = {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)}
    by_query = inspect_model(_model(_weights(0)), input_shapes=shapes, groups=True)["head_blocks"]
    assert [(b["heads"], b["units"], b["heads_per_unit"], b["prunable"]) for b in by_query] == [(6, 3, 2, True)] * 2
    assert by_query[0]["unit"] == "one query head of each key/value group" and by_query[0]["reason"] is None
    by_group = inspect_model(_model(_weights(0, kv_heads=3)), input_shapes=shapes, groups=True)["head_blocks"]
    assert [(b["heads"], b["units"], b["heads_per_unit"]) for b in by_group] == [(6, 3, 2)] * 2
    assert by_group[0]["unit"] == "a key/value head with its 2 query heads"
    path = tmp_path / "gqa.onnx"
    onnx.save(_model(_weights(0)), str(path))
    assert main(["inspect", str(path), "--groups", "--input-shape", f"sequence={TOKENS}"]) == 0
    out = capfd.readouterr().out
    assert out.count("6 heads in 3 units of one query head of each key/value group, prunable") == LAYERS
