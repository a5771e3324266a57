"""The robustness grid's spec: what `python -m calray.robustness` and a sweep file's ``robustness:``
block may ask for (noise kinds × ε × attacked modalities × modes, seeds, cells, the Ray resources of
a test-mode task or a retrain). Light: pydantic only, so validating a sweep file imports neither
torch nor Ray.

``missing`` (a modality absent at test time) is a kind of its own: ε has no meaning for it, so it
gets the rows ε = MISSING_EPS (absent) and, when the grid's ``eps`` lists 0, ε = 0 (clean), and it
is test-mode only (absent in training too would be a unimodal model, not a robustness setting)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calray.config import check_seeds, seed_list, validation_error_message
from calray.errors import ConfigError

KINDS = ("gaussian", "salt_pepper", "missing")
DEFAULT_KINDS = ("gaussian", "salt_pepper")
MODES = ("test", "train+test")
ALL = "all"  # `attacked`: the dataset's default attacked modalities (noise.modalities unset)
MISSING = "missing"
MISSING_EPS = 1.0  # the ε of a `missing` row: the modality is absent (ε = 0: clean)


class GridSpec(BaseModel):
    """What to run; also the shape of a sweep file's ``robustness:`` block."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[Literal["gaussian", "salt_pepper", "missing"]] = Field(default_factory=lambda: list(DEFAULT_KINDS))
    eps: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = Field(default_factory=lambda: [0.0, 5.0, 10.0])
    modes: list[Literal["test", "train+test"]] = Field(default_factory=lambda: ["test"])
    # which modalities are attacked: "all" (the dataset's default ones) or one modality name; a row each
    attacked: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: [ALL])
    missing_fill: Literal["zero", "mean"] = "zero"  # kind `missing`: zero input, or the training-set mean input
    test_tasks: bool = True  # test mode as Ray tasks (one per target × kind); false: one after another here
    noise_seeds: int | list[int] = 3  # N → seeds 0..N-1, or an explicit list
    train_seeds: int | list[int] = 1  # train+test replicates (training seeds)
    cells: list[str] | None = None  # glob patterns of sweep cells to include (default: every cell)
    epochs: int | None = Field(None, ge=1)  # train+test: override optim.epochs of the retrains
    cpus_per_trial: float = Field(1.0, gt=0.0)  # Ray resources of one retrain / one test-mode task
    gpus_per_trial: float = Field(0.0, ge=0.0)
    max_concurrent_trials: int | None = Field(None, ge=1)

    @field_validator("kinds", "modes", "eps", "attacked")
    @classmethod
    def _non_empty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("must list at least one value")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate values in {v}")
        return v

    @field_validator("noise_seeds", "train_seeds")
    @classmethod
    def _seeds(cls, v):
        return check_seeds(v)

    @model_validator(mode="after")
    def _missing_is_test_only(self):
        if MISSING in self.kinds and "test" not in self.modes:
            raise ValueError("kind 'missing' (a modality absent at test time) runs in mode 'test' only; "
                             "add 'test' to modes or drop 'missing' from kinds")
        return self

    @property
    def noise_seed_list(self) -> list[int]:
        return seed_list(self.noise_seeds)

    @property
    def train_seed_list(self) -> list[int]:
        return seed_list(self.train_seeds)


def parse_grid(grid: dict | GridSpec | None, source: str = "robustness grid", prefix: str = "") -> GridSpec:
    """Validate a grid dict; a problem raises one ConfigError naming the source and key (``eps.1``)."""
    if isinstance(grid, GridSpec):
        return grid
    if grid is None:
        grid = {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{source}: {prefix or '<root>'}: must be a mapping, got {type(grid).__name__}")
    try:
        return GridSpec.model_validate(grid)
    except ValidationError as e:
        raise ConfigError(validation_error_message(e, source, prefix=prefix)) from None
