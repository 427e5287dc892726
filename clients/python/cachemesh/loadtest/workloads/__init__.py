"""The load test's workloads, built by name (see ``build``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cachemesh.loadtest.workloads.base import DataInvalid, DataMissing, Item, Workload, normalise
from cachemesh.loadtest.workloads.bfcl import BfclTools
from cachemesh.loadtest.workloads.faq import QuoraFaq
from cachemesh.loadtest.workloads.mix import Mix, parse_weights
from cachemesh.loadtest.workloads.synthetic import Synthetic
from cachemesh.loadtest.workloads.tau import TauAgent
from cachemesh.loadtest.workloads.unrelated import Unrelated

NAMES = ("synthetic", "agent", "tools", "faq", "unrelated", "mix")
DEFAULT_MIX = "agent=0.25,tools=0.15,faq=0.45,unrelated=0.15"

__all__ = [
    "NAMES",
    "DataInvalid",
    "DataMissing",
    "Item",
    "Workload",
    "WorkloadSpec",
    "build",
    "normalise",
]


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that shapes a workload; the same spec always yields the same requests."""

    name: str
    seed: int = 7
    namespace: str = ""
    data_dir: Path = Path("../shared/data")
    mix: str = DEFAULT_MIX
    repeat_rate: float = 0.3
    paraphrase_rate: float = 0.3


def build(spec: WorkloadSpec) -> Workload:
    if spec.name not in NAMES:
        raise ValueError(f"workload: unknown {spec.name!r}; use one of {', '.join(NAMES)}")
    if spec.name == "mix":
        weights = parse_weights(spec.mix)
        unknown = set(weights) - set(NAMES[:-1])
        if unknown:
            raise ValueError(f"--mix: unknown workloads {sorted(unknown)}")
        parts = {name: _single(name, spec, spec.seed + i) for i, name in enumerate(sorted(weights))}
        return Mix(parts, weights, spec.seed)
    return _single(spec.name, spec, spec.seed)


def _single(name: str, spec: WorkloadSpec, seed: int) -> Workload:
    if name == "synthetic":
        return Synthetic(seed, spec.namespace)
    if name == "agent":
        return TauAgent(spec.data_dir, seed, spec.namespace)
    if name == "tools":
        return BfclTools(spec.data_dir, seed, spec.namespace)
    if name == "faq":
        return QuoraFaq(spec.data_dir, seed, spec.namespace, spec.repeat_rate, spec.paraphrase_rate)
    return Unrelated(spec.data_dir, seed, spec.namespace)
