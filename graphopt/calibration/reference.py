"""A model's own outputs kept from a calibration run, for a fidelity check that then runs only the candidate.

`optimize` reports how far the rewritten model's outputs are from the original's on the calibration
data. Calibration has already run the model over that data, as the normalising passes left it (exact
rewrites: folded BatchNorm, removed identities, folded constants), so the last round of that first
measurement also exposes the graph outputs and keeps them, batch by batch, instead of the check running
the original over the data once more.

Which run qualifies: the pass manager notes the cone fingerprints (graphopt.calibration.capture) of the
graph outputs once the normalising passes are done; a measurement whose model has the same fingerprints
for every output computes exactly those outputs, whatever a pass did before asking. Outputs are kept
only when every graph output is computed by a node and has a declared element type, the run is local
(not on a Ray cluster), and the kept values stay under `limit` bytes (past it they are dropped and the
check runs the reference model itself).

Numerics: the kept values come from an optimised onnxruntime session (calibration runs at full graph
optimisation) of the normalised graph, so they differ from an unoptimised run of the model as given by
float rounding only; the check then runs the candidate at the same optimisation level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.calibration.capture import TensorInfo


def output_cones(model: onnx.ModelProto, cones: dict[str, str]) -> dict[str, str] | None:
    """The fingerprints of `model`'s graph outputs, or None where they cannot be kept (an output that no node
    computes, or one without a declared element type)."""
    produced = {output for node in model.graph.node for output in node.output if output}
    outputs = list(model.graph.output)
    if not outputs or any(o.name not in produced or not o.type.tensor_type.elem_type for o in outputs):
        return None
    return {o.name: cones[o.name] for o in outputs}


@dataclass
class KeptOutputs:
    """The graph outputs of one calibration run, batch by batch (each batch: name -> value)."""

    infos: dict[str, TensorInfo]  # what exposing the outputs needs: their element types
    limit: int
    batch_size: int = 0
    batches: list[dict[str, np.ndarray]] = field(default_factory=list)
    nbytes: int = 0
    complete: bool = False  # every batch of the data was kept
    dropped: bool = False  # past `limit`: nothing is kept

    @classmethod
    def for_model(cls, model: onnx.ModelProto, limit: int) -> KeptOutputs:
        infos = {}
        for output in model.graph.output:
            elem_type = output.type.tensor_type.elem_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
            infos[output.name] = TensorInfo(output.name, dtype, (), elem_type, False)
        return cls(infos, limit)

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def add(self, values: dict[str, np.ndarray], batch_size: int) -> None:
        """One batch's outputs (taken as they are: the caller hands over arrays it no longer writes)."""
        if self.dropped:
            return
        self.batch_size = batch_size
        self.nbytes += sum(values[name].nbytes for name in self.infos)
        if self.nbytes > self.limit:
            self.batches, self.dropped = [], True
            return
        self.batches.append({name: values[name] for name in self.infos})

    def finish(self) -> None:
        self.complete = not self.dropped

    def batches_for(self, names: list[str], batch_size: int) -> list[dict[str, np.ndarray]] | None:
        """The kept batches when they hold every output in `names` and were cut in feeds of `batch_size`
        samples (the same batches a check of that batch size reads), else None."""
        usable = self.complete and self.batch_size == batch_size and set(names) <= set(self.infos)
        return self.batches if usable else None
