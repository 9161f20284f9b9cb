"""Which input masks token statistics: `choose_mask` turns the `mask_input` option into a `MaskChoice`.

- NAME: that input ("given"); "none": no mask ("disabled");
- not given, with a statistics file: the file's own mask ("statistics file"), so that its statistics
  stay valid (a different choice makes the file stale, graphopt.calibration.collect);
- not given: the one integer or boolean [batch, sequence] input graphopt.analysis.mask finds reaching a
  Softmax as an additive bias or an attention op's mask input ("found automatically"); none when no input
  or several qualify ("not found", with the reasons).
Which entries mark tokens that count ("nonzero" or "zero") comes from the graph where it can be read
there, else nonzero entries count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graphopt.analysis.mask import MaskInput, find_masks
from graphopt.errors import OptionError
from graphopt.ir.shapes import input_specs


@dataclass(frozen=True)
class MaskChoice:
    """The input whose entries say which token rows enter statistics (None: every row), and why it."""

    name: str | None
    how: str  # "found automatically", "given", "statistics file", "disabled", "not found"
    keeps: str = "nonzero"  # which entries mark the tokens that count: "nonzero" or "zero"
    detail: str = ""

    def kept(self, values: np.ndarray) -> np.ndarray:
        """True where a token counts."""
        return values != 0 if self.keeps == "nonzero" else values == 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "how": self.how, "found_automatically": self.how == "found automatically",
                "keeps": self.keeps if self.name is not None else None, "detail": self.detail}


def choose_mask(model: onnx.ModelProto, requested: str | None, *, inherited: str | None = None,
                from_file: bool = False) -> MaskChoice:
    """The mask for statistics on `model`: `requested` NAME or "none"; else the statistics file's
    (`inherited`, when `from_file`); else the one found in the graph (see the module docstring)."""
    names = [spec.name for spec in input_specs(model)]
    if requested is not None and requested.lower() == "none" and "none" not in names:
        return MaskChoice(None, "disabled", detail="--mask-input none")
    found, rejected = find_masks(model)
    if requested is None and not from_file:
        return _found_mask(found, rejected)
    name = requested if requested is not None else inherited
    if name is None:
        return MaskChoice(None, "statistics file", detail="the statistics file was computed without a mask")
    if name not in names:
        raise OptionError(f"mask input '{name}' is not a model input (inputs: {', '.join(names)})")
    evidence = next((mask for mask in found if mask.name == name), None)
    return MaskChoice(name, "given" if requested is not None else "statistics file",
                      evidence.keeps if evidence is not None else "nonzero",
                      evidence.evidence if evidence is not None else "")


def _found_mask(found: list[MaskInput], rejected: dict[str, str]) -> MaskChoice:
    """The one [batch, sequence] mask found, or none with the reasons."""
    usable = [mask for mask in found if mask.rank == 2]
    if len(usable) == 1:
        return MaskChoice(usable[0].name, "found automatically", usable[0].keeps, usable[0].evidence)
    if usable:
        listed = ", ".join(mask.name for mask in usable)
        return MaskChoice(None, "not found", detail=f"several inputs are attention masks ({listed}): none taken; "
                          "choose one with --mask-input")
    reasons = [f"{m.name}: {m.evidence}, but its rank is {m.rank}, not [batch, sequence]" for m in found]
    reasons += [f"{name}: {why}" for name, why in rejected.items()]
    return MaskChoice(None, "not found", detail="; ".join(reasons) or "no integer or boolean input")
