"""Which classes a run trains on and which it is tested on (`protocol`, docs/reproduce.md "Base-to-novel").

lodo and multidomain: every class, everywhere. base2novel (CoOp's base-to-novel generalisation): the data set's
class list, in its canonical order, is cut in two; the first ceil(C/2) classes are "base", the rest "novel"
(CoOp's `math.ceil(n / 2)`: 4 base and 3 novel of PACS's 7). Clients train, and the round is selected, on base
classes only; every evaluated split is scored twice, on its base-class images among the base classes and on its
novel-class images among the novel classes (`trip.methods.base.Split.parts`), and the two are summarised by their
harmonic mean."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from trip.errors import TripError

BASE, NOVEL = "base", "novel"  # the parts a base2novel split is scored on, the first one selects the round


@dataclass(frozen=True)
class ClassSplit:
    """Class indices (into the data set's class list) of the base and the novel half."""

    base: tuple[int, ...]
    novel: tuple[int, ...]

    @property
    def parts(self) -> dict[str, tuple[int, ...]]:
        return {BASE: self.base, NOVEL: self.novel}

    def trained(self, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The images of `idx` (indices into `labels`) that a client trains on: those of base classes."""
        return idx[np.isin(labels[idx], self.base)]

    def names(self, classes: tuple[str, ...]) -> dict[str, list[str]]:
        """What the run folder records (results.json "classes")."""
        return {part: [classes[c] for c in cols] for part, cols in self.parts.items()}


def class_split(protocol: str, classes: tuple[str, ...]) -> ClassSplit | None:
    """The base/novel cut of `classes` under base2novel; None under the other protocols (every class)."""
    if protocol != "base2novel":
        return None
    if len(classes) < 2:
        raise TripError(f"protocol base2novel needs at least 2 classes to cut into base and novel; the data set "
                        f"has {len(classes)}: use protocol lodo")
    cut = math.ceil(len(classes) / 2)
    return ClassSplit(tuple(range(cut)), tuple(range(cut, len(classes))))


def check_methods(protocol: str, methods: dict[str, bool]) -> None:
    """`methods`: label -> whether the method scores classes no client trained on (`Method.novel_classes`)."""
    closed = [label for label, novel in methods.items() if not novel]
    if protocol == "base2novel" and closed:
        raise TripError(f"protocol base2novel tests classes no client trained on, and {', '.join(closed)} cannot "
                        f"predict those (such a method learns something per class, as FedAPT's class prompts or "
                        f"the linear probe's weight rows, that a novel class never trains): remove "
                        f"{'it' if len(closed) == 1 else 'them'} from methods, or use protocol lodo")


def harmonic_mean(values: list[float]) -> float:
    """The parts' summary: the accuracy itself for one part; 0 if a part is 0; NaN if one is missing (NaN)."""
    return statistics.harmonic_mean(values)
