"""Measures and tables of the transformer benchmark.

- `embedding_quality`: mean (and least) cosine between the original's and the result's embeddings of the same
  sentences, and the top-10 retrieval overlap: each sentence queries all the others by cosine similarity;
  the overlap of its 10 nearest neighbours under the original's embeddings with its 10 nearest under the
  result's, averaged over queries (1.0: every neighbour list kept).
- `language_quality`: perplexity of both models on the same held-out windows (bench/decoder_lm.perplexity),
  the relative increase, and how often their arg-max next characters agree.
- `table`: one Markdown row per exporter x configuration, with the issue's goals checked in the notes
  (encoder at 0.7 of MACs: cosine >= 0.97 and top-10 overlap >= 0.85; at 0.5: cosine >= 0.93; decoder at 0.7:
  perplexity increase <= 10%; every pruned row: efficiency = speedup x MAC ratio >= 0.9 at each batch).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from decoder_lm import perplexity


def retrieval_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k by reference ∩ top-k by candidate| / k; each embedding queries the others."""
    def top(embeddings: np.ndarray) -> np.ndarray:
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argpartition(-similarity, k, axis=1)[:, :k]
    ours, theirs = top(reference.astype(np.float64)), top(candidate.astype(np.float64))
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))


def embedding_quality(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    cosine = np.sum(reference * candidate, axis=1) / (np.linalg.norm(reference, axis=1)
                                                       * np.linalg.norm(candidate, axis=1))
    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "top10_overlap": retrieval_overlap(reference, candidate)}


def language_quality(targets: np.ndarray) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    def quality(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        original, result = perplexity(reference, targets), perplexity(candidate, targets)
        return {"perplexity_original": original, "perplexity": result, "perplexity_increase": result / original - 1,
                "next_char_agreement": float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))}
    return quality


ENCODER_GOALS = {0.7: {"cosine": 0.97, "top10_overlap": 0.85}, 0.5: {"cosine": 0.93}}
DECODER_GOAL = 0.10  # relative perplexity increase at 0.7 of MACs
EFFICIENCY_GOAL = 0.9


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _speed(record: dict[str, Any], batch: int) -> str:
    timing = record.get("latency", {}).get(f"batch_{batch}")
    if timing is None:
        return "-"
    return f"{timing['speedup']:.2f} ({timing['speedup_p10']:.2f}-{timing['speedup_p90']:.2f})"


def _notes(record: dict[str, Any], goals: list[str]) -> str:
    notes = [f"goal missed: {', '.join(goals)}"] if goals else []
    if record.get("latency_target"):
        aimed = record["latency_target"]
        notes += [f"latency {aimed['target']} at b{aimed['batch']}: predicted -> measured "
                  + ", ".join(f"{a['predicted']:.2f} -> {a['measured']:.2f}" for a in aimed["attempts"])]
    notes += ["target missed"] if record.get("target_reached") is False else []
    if record.get("method") != "none":  # the dense row is the control: its ratios are the noise floor
        notes += [f"slower b{t['batch']}" for t in record.get("latency", {}).values() if t["speedup"] < 1.0]
    notes += [record["error"][:160]] if "error" in record else []
    return "; ".join(notes).replace("|", "/")  # a Markdown cell


def _missed(record: dict[str, Any], decoder: bool) -> list[str]:
    quality, target = record.get("quality", {}), record["target"]
    if not quality or target is None:
        return []
    if decoder:
        increase = quality["perplexity_increase"]
        missed = [f"ppl +{increase:.1%} > {DECODER_GOAL:.0%}"] if target == 0.7 and increase > DECODER_GOAL else []
    else:
        missed = [f"{key} < {bound}" for key, bound in ENCODER_GOALS.get(target, {}).items() if quality[key] < bound]
    return missed + [f"eff b{t['batch']} < {EFFICIENCY_GOAL}" for t in record.get("latency", {}).values()
                     if t["efficiency"] < EFFICIENCY_GOAL]


def table(entry: dict[str, Any], decoder: bool) -> str:
    headers = ["exporter", "config", "target", "MACs", "params"]
    headers += (["ppl original", "ppl", "ppl increase", "next-char agree"] if decoder
                else ["cosine", "top-10 overlap"])
    headers += ["speedup b1 (p10-p90)", "speedup b8 (p10-p90)", "efficiency b1 / b8", "optimize s", "notes"]
    rows = []
    for result in entry.get("exporters", []):
        for record in result["rows"] or [{"label": "-", "target": None, "error": result.get("error", "")}]:
            row = [result["exporter"], record["label"], "-" if record["target"] is None else f"{record['target']}"]
            quality = record.get("quality")
            if "macs_ratio" not in record or quality is None:
                rows.append(row + [""] * (len(headers) - 4) + [_notes(record, [])])
                continue
            row += [f"{record['macs_ratio']:.3f}", f"{record['params_ratio']:.3f}"]
            row += ([f"{quality['perplexity_original']:.3f}", f"{quality['perplexity']:.3f}",
                     f"{quality['perplexity_increase']:+.1%}", f"{quality['next_char_agreement']:.3f}"] if decoder
                    else [f"{quality['cosine']:.4f}", f"{quality['top10_overlap']:.3f}"])
            efficiency = [t["efficiency"] for t in record.get("latency", {}).values()]
            row += [_speed(record, 1), _speed(record, 8), " / ".join(f"{e:.2f}" for e in efficiency),
                    f"{record['optimize_s']:.1f}", _notes(record, _missed(record, decoder))]
            rows.append(row)
    return _markdown(headers, rows)
