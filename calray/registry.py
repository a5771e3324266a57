"""Registries: the one list of every pluggable name (timm's `register_model` / `create_model`).

Each kind of plug-in — strategies, contribution variants, AIB modes, fusions, encoders, datasets,
noise kinds — has one `Registry`. Implementations register themselves where they are defined
(`@STRATEGIES.register("cal")`); config validation, the report's axis order and the parametrised
tests read `names()`. A registry knows the package whose import registers its entries (its
`provider`) and imports it on first lookup: config validation sits below those packages in the
layer order, so it must not import them at module level (that would be a cycle), yet it must see
every registered name. Adding a method is one file that registers itself plus its test.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

from calray.errors import ConfigError


class Registry:
    """name → entry (a class or a factory), in registration order."""

    def __init__(self, kind: str, key: str, provider: str):
        self.kind = kind  # e.g. "strategy"
        self.key = key  # the config key that names an entry, e.g. "method.strategy"
        self.provider = provider  # the package whose import registers every entry
        self._entries: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(entry: Any) -> Any:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.provider)

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Any:
        self._load()
        if name not in self._entries:
            raise ConfigError(f"{self.key}: unknown {self.kind} {name!r}; known: {', '.join(self._entries)}")
        return self._entries[name]

    def check(self, name: str) -> str:
        """`name` if registered; a ValueError naming the known ones otherwise (pydantic validators)."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return name


STRATEGIES = Registry("strategy", "method.strategy", "calray.method.plugins")
CONTRIBUTIONS = Registry("contribution variant", "method.contribution", "calray.method.contribution")
AIB_MODES = Registry("AIB mode", "method.aib", "calray.method.aib")
FUSIONS = Registry("fusion", "model.fusion", "calray.models.fusion_plugins")
ENCODERS = Registry("encoder", "model.encoders.<m>.name", "calray.models.encoders")
DATASETS = Registry("dataset", "data.dataset", "calray.data")
NOISE_KINDS = Registry("noise kind", "noise.kind", "calray.data.noise")
