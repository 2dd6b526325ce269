"""LM-head shapes of real models (hidden size H, vocabulary V, logit soft-cap), and CPU defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    vocab: int
    tokens: Tuple[int, ...]
    softcap: Optional[float] = None
    source: str = ""


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("cpu-small", 256, 8192, (1024,), None,
           "small CPU default (V/H = 32, as Llama-3): every provider that runs on CPU in under two minutes"),
    Preset("cpu-anchor", 1024, 32000, (8192,), None,
           "the CPU shape of design/anchors.md (N 8192, H 1024, V 32000); minutes per provider on 2 cores"),
    Preset("llama3-8b", 4096, 128256, (4096, 8192, 16384), None, "Llama-3/3.1-8B"),
    Preset("qwen2.5-7b", 3584, 152064, (4096, 8192), None, "Qwen2.5-7B / Qwen2.5-Math-7B"),
    Preset("qwen2.5-1.5b", 1536, 151936, (4096, 8192), None, "Qwen2.5-1.5B / Qwen2.5-Math-1.5B"),
    Preset("gemma2-2b", 2304, 256000, (4096, 8192), 30.0, "Gemma-2-2B (final_logit_softcapping 30)"),
    Preset("llama2-7b", 4096, 32000, (4096, 8192), None, "Llama-2-7B"),
)}

DEFAULT_CPU_PRESET = "cpu-small"
DEFAULT_GPU_PRESET = "llama3-8b"
