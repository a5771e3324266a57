"""A sweep's search space: the distributions of `search.space` (and of a variant's own `space:`) and
the search settings. Light: pydantic only (no Ray, no Optuna), like calray.sweep.spec."""

from __future__ import annotations

import builtins
import math
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of: loguniform [lo, hi], uniform [lo, hi], int [lo, hi] (inclusive), choice [...]."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int: tuple[builtins.int, builtins.int] | None = None  # builtins: the field's own name shadows int here
    choice: list[Any] | None = None
    log: bool = False  # int only: sample on a log scale

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int, choice "
                             f"(got {', '.join(given) or 'none'})")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice: needs at least one value")
            return self
        lo, hi = getattr(self, kind)
        if not lo < hi and not (kind == "int" and lo == hi):
            raise ValueError(f"{kind}: lower bound {lo} must be below upper bound {hi}")
        if (kind == "loguniform" or (kind == "int" and self.log)) and lo <= 0:
            raise ValueError(f"{kind}: a log scale needs a lower bound > 0 (got {lo})")
        if self.log and kind != "int":
            raise ValueError("log: only for int ranges (use loguniform for floats)")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None)

    def grid_values(self) -> list[Any] | None:
        """The values of a discrete dimension (choice, int range), or None for continuous ones."""
        if self.choice is not None:
            return list(self.choice)
        if self.int is not None:
            return list(range(self.int[0], self.int[1] + 1))
        return None

    def sample(self, rng: random.Random) -> Any:
        """A value drawn without Ray/Optuna (used by --dry-run to show one trial's config)."""
        if self.choice is not None:
            return rng.choice(self.choice)
        if self.int is not None:
            lo, hi = self.int
            if self.log:
                return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            return rng.randint(lo, hi)
        if self.loguniform is not None:
            lo, hi = self.loguniform
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        lo, hi = self.uniform
        return rng.uniform(lo, hi)

    def check_values(self) -> list[Any]:
        """Values checked against the run-config schema: every choice, or both range ends."""
        if self.choice is not None:
            return list(self.choice)
        return list(getattr(self, self.kind))


ALIASES = {"method.lambda_": "method.lambda"}  # dotted keys written the Python way


def alias_keys(space):
    return {ALIASES.get(k, k): d for k, d in space.items()} if isinstance(space, dict) else space


class SearchSpec(_Strict):
    algorithm: Literal["optuna", "random", "grid"] = "optuna"  # optuna = seeded TPE
    num_samples: int = Field(10, ge=1)  # trials per cell (grid: default = grid size)
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    seed: int = 0  # sampler seed (the same for every cell: cells see paired proposals)
    n_startup_trials: int | None = Field(None, ge=1)  # TPE: random trials before modelling
    space: dict[str, Distribution] = Field(default_factory=dict)

    @field_validator("space", mode="before")
    @classmethod
    def _aliases(cls, v):
        return alias_keys(v)

    @model_validator(mode="after")
    def _grid_is_discrete(self):
        if self.algorithm == "grid":
            for key, dist in self.space.items():
                if dist.grid_values() is None:
                    raise ValueError(f"algorithm grid needs choice or int dimensions; {key} is {dist.kind}")
        return self

    def grid_size(self) -> int:
        return math.prod(len(d.grid_values()) for d in self.space.values()) if self.space else 1
