"""Repair by distillation: fine-tune a pruned model's weights toward the original model's outputs.

`repair(original, pruned, data, steps=...)` runs the original once in onnxruntime (no graph optimisation)
over the calibration data for its float outputs and the intermediate `tensors` asked for, builds the pruned
model as a torch module (graphopt.torch.interpreter), and trains its parameters with Adam for `steps`
mini-batches (at a constant rate, or `schedule="cosine"`: decayed along a half cosine to 0 at the last step) on

    L = mean over matched tensors t of  mean((ŷ_t − y_t)²) / mean(y_t²),

each tensor's squared error normalised by the reference's energy on the training part. With an attention
mask (`mask`, the input calibration statistics are masked by), a tensor of rank 3 or more whose leading axes
are the mask's [batch, sequence] counts only the token rows the mask keeps, in the loss, the energy and the
held-out error: padding is not distilled. A seeded fraction
`held_out` of the calibration samples is kept out of training; the relative error on it
(Σ‖ŷ_t − y_t‖² / Σ‖y_t‖², averaged over t) is measured before training, every `steps // 25` steps and at
the end, and the parameters with the lowest held-out error are returned, so the result is never worse on
that slice than the starting weights (when no step improved it, nothing is returned). The references are kept
in memory in float16 where a batch's tensor fits it (every value within ±60000 and its root mean square at
least 1e-2, so each value is rounded by at most 2^-11 of itself, or by 2^-25 in float16's subnormal range:
by the triangle inequality each relative L2 error ‖ŷ − y‖ / ‖y‖, the square root of a tensor's loss, moves by at
most about 4.9e-4), else as onnxruntime returns them; the losses are computed in float64. The
references of a transformer's normalisation layers over thousands of sentences are the repair's largest
memory; the report's `references` says their dtypes and size. A tensor is matched
by name: an output of both models, or a tensor asked for that nodes of both models produce, with the same
shape at run time; the others are reported as skipped.

The returned arrays keep the initializers' names, shapes and dtypes; `write_back` puts them into a copy of
the model and touches nothing else. The module imports torch: the core reaches it only when --repair asks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from tqdm.auto import tqdm

from graphopt.calibration.data import Dataset
from graphopt.calibration.mask import MaskChoice
from graphopt.calibration.session import make_session
from graphopt.errors import DataError, OptionError
from graphopt.ir import weights
from graphopt.torch.interpreter.module import GraphModule

log = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})
# `tensors=("auto",)`: the first output of every normalisation node of the original (the block outputs of a
# transformer, its residual stream), where the pruned model computes it too with the same shape
NORMALISATIONS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                            "SkipSimplifiedLayerNormalization", "RMSNormalization", "RMSNorm",
                            "GroupNormalization", "InstanceNormalization"})
AUTO = "auto"
CHECKS = 25  # held-out evaluations over a run (plus the start and the end)
SCHEDULES = ("constant", "cosine")
LR_RESTARTS = 2  # a check worse than the start after a tenth of the steps: restart at a tenth of the rate

Feed = dict[str, np.ndarray]


@dataclass
class Repaired:
    """The trained initializers by name (empty when the starting weights stayed best) and the report entry."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Targets:
    feeds: list[Feed]
    references: list[dict[str, np.ndarray]]


def _produced(model: onnx.ModelProto) -> set[str]:
    return {name for node in model.graph.node for name in node.output if name}


def matched_names(original: onnx.ModelProto, pruned: onnx.ModelProto,
                  tensors: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the tensors distilled, by name: float outputs of both models, then `tensors` both compute; why the
    others were skipped). `tensors` ["auto"]: the normalisation nodes' outputs both models compute."""
    pruned_outputs = {o.name for o in pruned.graph.output}
    names, skipped = [], []
    for output in original.graph.output:
        if output.type.tensor_type.elem_type not in FLOAT_TYPES:
            skipped.append(f"output '{output.name}': not a float tensor")
        elif output.name not in pruned_outputs:
            skipped.append(f"output '{output.name}': not an output of the pruned model")
        else:
            names.append(output.name)
    in_original, in_pruned = _produced(original), _produced(pruned)
    if list(tensors) == [AUTO]:
        tensors = [node.output[0] for node in original.graph.node
                   if node.op_type in NORMALISATIONS and node.output and node.output[0] in in_pruned]
    for name in tensors:
        if name in names:
            continue
        if name not in in_original or name not in in_pruned:
            where = "the original" if name not in in_original else "the pruned model"
            skipped.append(f"tensor '{name}': no node of {where} produces it")
        else:
            names.append(name)
    return names, skipped


def _exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return exposed


HALF_MAX = 6.0e4  # below float16's largest finite value, 65504
HALF_MIN_RMS = 1e-2  # a tensor at this scale loses at most 2^-25 absolutely in float16's subnormal range


def stored(reference: np.ndarray) -> np.ndarray:
    """`reference` as kept for the losses: float16 where every value fits float16's range and the tensor's
    scale keeps the rounding relative (see the module docstring), else unchanged."""
    if reference.dtype != np.float32 or reference.size == 0 or not np.isfinite(reference).all():
        return reference
    if float(np.max(np.abs(reference))) > HALF_MAX:
        return reference
    if math.sqrt(float(np.mean(np.square(reference, dtype=np.float64)))) < HALF_MIN_RMS:
        return reference
    return reference.astype(np.float16)


def _reference(original: onnx.ModelProto, data: Dataset, names: list[str], batch_size: int, device: str,
               threads: int) -> _Targets:
    """The original's `names` on every feed of `data`, kept as `stored` says."""
    session = make_session(_exposed(original, names), device=device, threads=threads)
    accepted = {i.name for i in session.get_inputs()}
    feeds = [{k: v for k, v in feed.items() if k in accepted} for feed in data.batches(batch_size)]
    references = [{n: stored(v) for n, v in zip(names, session.run(names, feed))} for feed in feeds]
    return _Targets(feeds, references)


def _footprint(*targets: _Targets) -> dict[str, Any]:
    """The references' size in MB and how many batch tensors each dtype holds."""
    arrays = [a for t in targets for reference in t.references for a in reference.values()]
    dtypes: dict[str, int] = {}
    for a in arrays:
        dtypes[str(a.dtype)] = dtypes.get(str(a.dtype), 0) + 1
    return {"mb": round(sum(a.nbytes for a in arrays) / 1e6, 1), "dtypes": dtypes}


def _split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    count = data.num_samples if data.arrays is not None else len(list(data.feeds or ()))
    if count is not None and count < 2:
        raise DataError("--repair keeps a part of the calibration data out of training to choose the weights it "
                        f"returns: give at least 2 calibration samples (got {count})")
    return data.split(fraction, seed)


def _torch_feed(feed: Feed, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feed.items()}


class _Distiller:
    """The pruned module, its targets and the two losses (training batch, held-out evaluation)."""

    def __init__(self, module: GraphModule, names: list[str], train: _Targets, device: torch.device,
                 mask: MaskChoice | None = None) -> None:
        self.module, self.names, self.train, self.device = module, names, train, device
        self.mask = mask if mask is not None and mask.name is not None else None
        self._energies: dict[int, tuple[_Targets, dict[str, tuple[float, int]]]] = {}
        self.energy = {n: max(total / max(count, 1), 1e-30) for n, (total, count) in self.energies(train).items()}

    def energies(self, targets: _Targets) -> dict[str, tuple[float, int]]:
        """Per tensor, (Σ y² over the rows that count, how many entries that is) over `targets`; computed once
        per set of targets (the held-out slice is read at every check)."""
        if id(targets) not in self._energies:
            found = dict.fromkeys(self.names, (0.0, 0))
            for feed, reference in zip(targets.feeds, targets.references):
                for n in self.names:
                    kept = self.kept_rows(feed, reference[n].shape)
                    rows = reference[n] if kept is None else reference[n][kept]
                    total, count = found[n]
                    found[n] = (total + float(np.sum(np.square(rows, dtype=np.float64))), count + rows.size)
            self._energies[id(targets)] = (targets, found)  # the targets held: their id stays theirs
        return self._energies[id(targets)][1]

    def kept_rows(self, feed: Feed, shape: tuple[int, ...]) -> np.ndarray | None:
        """The [batch, sequence] rows of a tensor shaped `shape` that the mask keeps (None: every row)."""
        if self.mask is None or self.mask.name not in feed:
            return None
        values = np.asarray(feed[self.mask.name])
        # rank 3 or more: a rank-2 tensor whose second axis happens to be as long as the sequence may be a
        # pooled [batch, hidden] one
        if values.ndim != 2 or len(shape) < 3 or tuple(shape[:2]) != values.shape:
            return None
        return self.mask.kept(values)

    def _squared(self, found: torch.Tensor, reference: np.ndarray, feed: Feed) -> tuple[torch.Tensor, int]:
        """(Σ (ŷ − y)² over the rows that count, how many entries that is)."""
        difference = torch.square(found.double() - torch.from_numpy(reference).to(self.device).double())
        kept = self.kept_rows(feed, reference.shape)
        if kept is None:
            return difference.sum(), difference.numel()
        chosen = difference[torch.from_numpy(kept).to(self.device)]
        return chosen.sum(), chosen.numel()

    def batch_loss(self, index: int) -> torch.Tensor:
        feed = self.train.feeds[index]
        found = self.module(_torch_feed(feed, self.device), self.names)
        losses = []
        for n in self.names:
            squared, count = self._squared(found[n], self.train.references[index][n], feed)
            losses.append(squared / max(count, 1) / self.energy[n])
        return torch.stack(losses).mean()

    @torch.no_grad()
    def error(self, targets: _Targets) -> float:
        """Σ‖ŷ − y‖² / Σ‖y‖² per tensor over `targets` (the rows that count), averaged over tensors."""
        squared = dict.fromkeys(self.names, 0.0)
        for feed, reference in zip(targets.feeds, targets.references):
            found = self.module(_torch_feed(feed, self.device), self.names)
            for n in self.names:
                squared[n] += float(self._squared(found[n], reference[n], feed)[0])
        energy = self.energies(targets)
        return float(np.mean([squared[n] / max(energy[n][0], 1e-30) for n in self.names]))


def _shape_mismatches(module: GraphModule, names: list[str], targets: _Targets,
                      device: torch.device) -> list[str]:
    """The names whose pruned tensor is shaped unlike the reference (on the first feed)."""
    with torch.no_grad():
        found = module(_torch_feed(targets.feeds[0], device), names)
    return [n for n in names if tuple(found[n].shape) != targets.references[0][n].shape]


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("--repair: CUDA requested but torch sees no GPU; training on the CPU")
        return torch.device("cpu")
    return torch.device(device)


def repair(original: onnx.ModelProto, pruned: onnx.ModelProto, data: Dataset, *, steps: int, lr: float = 1e-3,
           schedule: str = "constant", tensors: Sequence[str] = (), batch_size: int = 32, held_out: float = 0.1,
           seed: int = 0, device: str = "cpu", threads: int = 0, mask: MaskChoice | None = None,
           progress: bool = False) -> Repaired:
    """Distil `pruned` toward `original` on `data` (see the module docstring)."""
    if int(steps) < 1 or not float(lr) > 0.0:
        raise OptionError(f"--repair needs steps >= 1 and --repair-lr > 0, got {steps} and {lr}")
    rate = _Rate(float(lr), schedule)
    start = time.perf_counter()
    where = _device(device)
    module = GraphModule(pruned).to(where)
    if not module.parameter_names:
        raise OptionError("--repair found no weight to train in the pruned model (float weights of Conv, Gemm, "
                          "MatMul, their biases and normalisation scales)")
    names, skipped = matched_names(original, pruned, tensors)
    fit, held = _split(data, held_out, seed)
    train = _reference(original, fit, names, batch_size, device, threads)
    check = _reference(original, held, names, batch_size, device, threads)
    mismatched = _shape_mismatches(module, names, train, where)
    skipped += [f"tensor '{n}': shaped differently in the pruned model" for n in mismatched]
    names = [n for n in names if n not in mismatched]
    if not names:
        raise DataError("--repair has no tensor to match between the original and the pruned model: "
                        + "; ".join(skipped))
    with _torch_threads(threads):
        distiller = _Distiller(module, names, train, where, mask)
        report = _train(distiller, check, int(steps), rate, seed, progress)
    trained = module.parameters_by_name().items() if report["best_step"] else ()
    arrays = {n: p.detach().cpu().numpy().astype(_dtype_of(pruned, n)) for n, p in trained}
    report.update(tensors=names, skipped=skipped, parameters=len(module.parameter_names),
                  masked_by=distiller.mask.name if distiller.mask is not None else None,
                  samples={"train": _count(fit, train), "held_out": _count(held, check)},
                  references=_footprint(train, check),
                  seconds=time.perf_counter() - start)
    return Repaired(arrays, report)


def _count(data: Dataset, targets: _Targets) -> int:
    return sum(data.feed_samples(feed) for feed in targets.feeds)


def _dtype_of(model: onnx.ModelProto, name: str) -> np.dtype:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _restore(module: GraphModule, values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(module.parameters(), values):
            parameter.copy_(value)


@dataclass(frozen=True)
class _Rate:
    """Adam's learning rate: `start` for every step (`constant`) or decayed along a half cosine to 0 at the
    last step (`cosine`)."""

    start: float
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise OptionError(f"--repair-schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")

    def at(self, step: int, steps: int) -> float:
        """The rate of step `step` (1-based) of `steps`."""
        if self.schedule == "constant":
            return self.start
        return self.start * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max(steps, 1)))

    def scaled(self, factor: float) -> _Rate:
        return _Rate(self.start * factor, self.schedule)


@dataclass
class _Run:
    best: float
    best_step: int
    kept: list[torch.Tensor]


def _attempt(distiller: _Distiller, check: _Targets, steps: int, rate: _Rate, rng: np.random.Generator,
             start: tuple[float, list[torch.Tensor]], give_up: bool, bar: Any) -> _Run | None:
    """`steps` Adam steps at `rate` from the module's weights, checked on `check` every `steps // CHECKS`
    steps; None when `give_up` and the first check from a tenth of the steps on is worse than the starting
    error (`start`: Adam's first steps may spike before they settle)."""
    module = distiller.module
    optimizer = torch.optim.Adam(list(module.parameters()), lr=rate.start)
    found = _Run(start[0], 0, start[1])
    every = max(1, steps // CHECKS)
    judge = max(every, steps // 10) if give_up else steps + 1  # the step whose check may give up
    order: list[int] = []
    for step in range(1, steps + 1):
        if not order:
            order = rng.permutation(len(distiller.train.feeds)).tolist()
        for group in optimizer.param_groups:
            group["lr"] = rate.at(step, steps)
        optimizer.zero_grad(set_to_none=True)
        distiller.batch_loss(order.pop()).backward()
        optimizer.step()
        bar.update()
        if step % every == 0 or step == steps:
            error = distiller.error(check)
            if judge <= step < judge + every and error > start[0]:
                return None
            if error < found.best:
                found = _Run(error, step, [p.detach().clone() for p in module.parameters()])
            bar.set_postfix(held_out=f"{error:.4g}", best=f"{found.best:.4g}", lr=f"{rate.at(step, steps):.2g}")
    return found


def _train(distiller: _Distiller, check: _Targets, steps: int, lr: _Rate, seed: int,
           progress: bool = False) -> dict[str, Any]:
    """Adam on the distillation loss; the parameters at the lowest held-out error are left in the module.
    A held-out error above the starting one at the first check from a tenth of the steps on restarts from the
    starting weights at a tenth of the rate (at most `LR_RESTARTS` times: a pretrained transformer diverges
    at a rate that suits a network trained from scratch); the report's `lr_used` is the rate of the steps
    that count."""
    module = distiller.module
    rng = np.random.default_rng(seed)
    train_before, held_before = distiller.error(distiller.train), distiller.error(check)
    initial = [p.detach().clone() for p in module.parameters()]
    rate, run = lr, None
    with tqdm(total=steps, desc="repair", unit="step", disable=not progress, leave=False) as bar:
        for restart in range(LR_RESTARTS + 1):
            run = _attempt(distiller, check, steps, rate, rng, (held_before, initial), restart < LR_RESTARTS, bar)
            if run is not None:
                break
            log.info("repair: held-out error rose at the learning rate %.3g; restarting at %.3g", rate.start,
                     rate.start / 10)
            rate = rate.scaled(0.1)
            _restore(module, initial)
            bar.reset()
    assert run is not None  # the last attempt never gives up
    _restore(module, run.kept)
    log.info("repair: held-out error %.4g -> %.4g (best at step %d of %d)", held_before, run.best, run.best_step,
             steps)
    return {"steps": steps, "lr": lr.start, "lr_used": rate.start, "schedule": lr.schedule, "best_step": run.best_step,
            "loss_train_before": train_before, "loss_train_after": distiller.error(distiller.train),
            "loss_held_out_before": held_before, "loss_held_out_after": run.best}


def write_back(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `arrays` hold those values (same name, shape and dtype);
    nothing else changes."""
    found = onnx.ModelProto()
    found.CopyFrom(model)
    for tensor in found.graph.initializer:
        if tensor.name in arrays:
            old = weights.array_of(tensor)
            new = np.ascontiguousarray(arrays[tensor.name])
            if new.shape != old.shape or new.dtype != old.dtype:
                raise ValueError(f"write_back: '{tensor.name}' is {old.dtype}{list(old.shape)}, "
                                 f"got {new.dtype}{list(new.shape)}")
            doc = tensor.doc_string
            tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
            tensor.doc_string = doc
    return found
