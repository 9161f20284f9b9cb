"""The pass interface, its result object, the context passes share, and the registry.

A pass has a `name` (its CLI name and registry key), a `kind` ("prepass" for the normalising passes
every method runs first, "method" for what `optimize --method` selects) and `run(graph, ctx)`.
Unsupported patterns are not errors: a pass declines, records why in `PassResult.skipped`, and moves
on. It raises only for broken invariants (a bug) or bad user input (a `GraphoptError`).

The contract: each pass declares, from the named graph properties of `PROPERTIES`, what it
`requires` (without it the pass would silently decline or misjudge what the normalised graph lets it
handle), what it `ensures` (holds after it ran, whether or not it changed anything) and what it
`preserves` when it changes the graph; a change invalidates every other property. The manager
(graphopt.passes.manager) tracks which properties hold and refuses a pass whose requirements do not.
`PassResult.history` says, for every channel group a pass shrank, which channels went and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from graphopt.calibration.paired import PairedStats, PairRequest
    from graphopt.calibration.staged import Stages
    from graphopt.calibration.stats import StatRequest, TensorStats

log = logging.getLogger(__name__)


# graph properties a pass may require, ensure or preserve (the vocabulary of the pass contract)
PROPERTIES: dict[str, str] = {
    "constants_normalised": "weights and other constants are initializers, not Constant nodes or constant "
                            "Identity/Cast/CastLike/ConstantOfShape chains",
    "identities_removed": "no Identity or inference-mode Dropout node is left where removing it keeps the interface",
    "constants_folded": "no node whose inputs are all constant is left (If/Loop bodies and results above the "
                        "folding size limit aside)",
    "batchnorm_folded": "every BatchNormalization that follows a Conv/ConvTranspose/Gemm/MatMul it alone reads "
                        "is folded into it",
    "dead_code_removed": "every node and initializer feeds a graph output",
    "shapes_inferred": "tensors carry the dtypes and shapes ONNX shape inference gives for the current graph",
    "concat_selections_resolved": "no Gather or Slice picks from a single input of a Concat through the Concat",
}


def all_but(*names: str) -> frozenset[str]:
    """Every property except `names` (what a pass that changes those alone preserves)."""
    return frozenset(PROPERTIES) - frozenset(names)


# the contracts methods share: they read weights as initializers on inferred shapes (magnitude-like scores
# also need BatchNorm's scale folded into the weights), and changing channel counts invalidates shapes
READS_WEIGHTS = frozenset({"constants_normalised", "shapes_inferred"})
READS_FOLDED_WEIGHTS = READS_WEIGHTS | {"batchnorm_folded"}
CHANGES_CHANNELS = all_but("shapes_inferred")


@dataclass
class PassResult:
    """What a pass did. `history` holds one entry per channel group it shrank (see
    graphopt.passes.channels.engine.removal): plain JSON values, listed in the report only when present."""

    modified: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        found = {"modified": self.modified, "stats": dict(self.stats), "skipped": list(self.skipped)}
        if self.history:
            found["history"] = list(self.history)
        return found


@dataclass
class PassContext:
    """What passes may read besides the graph.

    `template` is the model the graph came from (for model-level fields and shape inference);
    `input_shapes` resolves dynamic input dimensions (batch 1); `data` is calibration data as an
    iterable of feed dicts, or None; `sample` its first sample, what a run to observe shapes is fed;
    `options` holds method options from the CLI or API; `cluster`
    (graphopt.calibration.cluster) runs calibration on Ray when the run was given --workers or
    --ray-address (None: in this process); `pipeline` names the methods of the run in order.
    """

    template: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    data: Iterable[dict[str, np.ndarray]] | None = None
    sample: dict[str, np.ndarray] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    cluster: Any = None
    pipeline: tuple[str, ...] = ()
    # the given model's MACs over the graph's, where a pass added MACs on the way (cob's opened post-norm
    # shortcuts): a --target-macs fraction of the model is this times that fraction of the graph
    macs_scale: float = 1.0
    # run once on the normalised graph, before the first method pass rewrites it: a refusal known from the
    # graph alone (--repair cannot train through an op) comes before the methods' work, not after it
    normalised_checks: list[Callable[[gs.Graph], None]] = field(default_factory=list)
    _calibrator: Any = field(default=None, init=False, repr=False, compare=False)
    _normalised_outputs: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def runs_after(self, method: str) -> tuple[str, ...]:
        """The methods of the pipeline that run after `method`."""
        return self.pipeline[self.pipeline.index(method) + 1:] if method in self.pipeline else ()

    def option(self, key: str, default: Any = None) -> Any:
        value = self.options.get(key)
        return default if value is None else value

    def calibration_mask(self) -> dict[str, Any] | None:
        """Which input masked the token statistics and how it was chosen, once statistics were asked for."""
        return self._calibrator.mask.to_json() if self._calibrator is not None else None

    def token_mask(self) -> Any:
        """The attention-mask choice (graphopt.calibration.mask.MaskChoice) of this run's statistics, or the
        one `mask_input` gives on the template where no statistics were asked for."""
        from graphopt.calibration.mask import choose_mask

        if self._calibrator is not None:
            return self._calibrator.mask
        return choose_mask(self.template, self.options.get("mask_input"))

    def statistics(self, requests: Iterable[StatRequest],
                   model: onnx.ModelProto | gs.Graph | None = None) -> dict[str, TensorStats]:
        """Activation statistics of `model` (a graph, a model, or by default the template).

        Served from `options["stats"]` (a file from `graphopt calibrate`) where still valid, else
        measured on `data`; a `GraphoptError` says to give --calib when neither can answer. One
        calibrator per context caches results, so a pass calling again on a partly rewritten graph
        (sequential mode) re-measures only the tensors downstream of its changes.
        """
        from graphopt.ir.graph import export_model

        if isinstance(model, gs.Graph):
            model = export_model(model, self.template)
        return self._calibration().statistics(model if model is not None else self.template, requests)

    def know_statistics(self, graph: gs.Graph, stats: dict[str, TensorStats]) -> None:
        """Statistics of tensors of `graph` that a pass knows exactly without measuring (rotated ones): later
        `statistics` calls on this graph read them as if measured."""
        from graphopt.ir.graph import export_model

        self._calibration().know(export_model(graph, self.template), stats)

    def paired_statistics(self, requests: Iterable[PairRequest], reference: onnx.ModelProto | gs.Graph,
                          model: onnx.ModelProto | gs.Graph, stages: Stages | None = None
                          ) -> dict[PairRequest, PairedStats]:
        """Paired statistics (graphopt.calibration.paired) of tensors of `reference` beside tensors of
        `model`, on the calibration data (never answered from a statistics file); `stages`
        (graphopt.calibration.staged) lets a sequence of calls resume each model where the last stopped."""
        from graphopt.ir.graph import export_model

        reference, model = (export_model(m, self.template) if isinstance(m, gs.Graph) else m
                            for m in (reference, model))
        return self._calibration().paired(reference, model, requests, stages)


    def staged_runs(self) -> Stages:
        """Frontier caches for a sequence of `paired_statistics` calls that go deeper each time, holding at most
        half the calibration memory bound in memory, the rest on disk (graphopt.calibration.staged)."""
        from graphopt.calibration.staged import Stages

        return Stages(self._calibration().memory_limit // 2)

    def output_probe(self, reference: onnx.ModelProto | gs.Graph, samples: int, key: str | None = None) -> Any:
        """A probe (graphopt.calibration.probe) of how far candidates' outputs move from `reference`'s on the
        first `samples` calibration samples, and the run's `--metric` (its key `key`) where one is given."""
        from graphopt.calibration.probe import OutputProbe
        from graphopt.errors import DataError
        from graphopt.ir.graph import export_model

        calibrator = self._calibration()
        if calibrator.data is None:
            raise DataError("probing each group's effect on the output runs the model on calibration data: give "
                            "--calib DATA.npz (a statistics file cannot answer it)")
        if isinstance(reference, gs.Graph):
            reference = export_model(reference, self.template)
        return OutputProbe(reference, calibrator.data, samples=samples, batch_size=calibrator.batch_size,
                           device=calibrator.device, threads=calibrator.threads, metric=self.option("metric"),
                           key=key)

    def _calibration(self) -> Any:
        """The context's calibrator (graphopt.calibration.collect), made on first use."""
        from graphopt.calibration.collect import context_calibrator

        if self._calibrator is None:
            self._calibrator = context_calibrator(self.data, self.template, self.options, self.progress,
                                                  self.cluster)
            if self._normalised_outputs:
                self._calibrator.keep_outputs(self._normalised_outputs)
        return self._calibrator

    def note_normalised(self, graph: gs.Graph) -> None:
        """`graph` computes the template's outputs (only normalising passes changed it): the first calibration
        run on a model computing the same outputs keeps them (graphopt.calibration.reference), so the
        fidelity check need not run the template again. Only the first call counts; without data it is a
        no-op."""
        from graphopt.calibration.capture import cone_fingerprints
        from graphopt.calibration.reference import output_cones
        from graphopt.ir.graph import export_model

        if self.data is None or self._normalised_outputs is not None or self._calibrator is not None:
            return
        model = export_model(graph, self.template)
        self._normalised_outputs = output_cones(model, cone_fingerprints(model)) or {}  # {}: none to keep

    def release_statistics(self) -> None:
        """Drop the statistics calibration cached (every pass has run); the outputs it kept stay."""
        if self._calibrator is not None:
            self._calibrator.release()

    def reference_batch_size(self) -> int | None:
        """The feed size of the outputs calibration kept (its last round's batch), None where none were kept."""
        kept = self._calibrator.kept_outputs if self._calibrator is not None else None
        return kept.batch_size if kept is not None and kept.complete and kept.batch_size else None

    def reference_outputs(self, model: onnx.ModelProto, batch_size: int) -> list[dict[str, np.ndarray]] | None:
        """The outputs of `model` (the template) as the normalised graph computed them over the calibration data,
        in feeds of `batch_size` samples, kept by calibration (see `note_normalised`); None where none were kept."""
        kept = self._calibrator.kept_outputs if self._calibrator is not None else None
        names = [output.name for output in model.graph.output]
        return kept.batches_for(names, batch_size) if kept is not None else None


class Pass:
    name: ClassVar[str]
    kind: ClassVar[str] = "prepass"
    description: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str]] = frozenset()  # when it changes the graph; the rest is invalidated
    # prunes layers whose weights are stored as integers (QDQ) as float layers, their integers written back
    # afterwards (graphopt.passes.quantize.through)
    through_quantized: ClassVar[bool] = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError


PassT = TypeVar("PassT", bound=type[Pass])
REGISTRY: dict[str, type[Pass]] = {}


def register(cls: PassT) -> PassT:
    """Class decorator adding a pass to the registry; duplicate names are refused."""
    if cls.name in REGISTRY:
        raise ValueError(f"a pass named '{cls.name}' is already registered ({REGISTRY[cls.name].__module__})")
    unknown = sorted((cls.requires | cls.ensures | cls.preserves) - set(PROPERTIES))
    if unknown:  # a misspelt property would silently never hold
        raise ValueError(f"pass '{cls.name}' declares unknown properties {unknown} (known: {', '.join(PROPERTIES)})")
    REGISTRY[cls.name] = cls
    return cls
