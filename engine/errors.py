"""Every exception omnimerge raises on purpose, in one place.

Each class also inherits the builtin a caller would naturally catch (``FileNotFoundError``,
``ValueError``, ...). Messages name the culprit (file, tensor, expert), what was expected and the fix.
"""

from __future__ import annotations

__all__ = [
    "OmnimergeError",
    "RecipeError",
    "SourceError",
    "SourceNotFoundError",
    "UnsafeCheckpointError",
    "TensorMismatchError",
    "NonFiniteError",
    "PlanError",
    "OutputExistsError",
    "ResumeError",
    "ShardJobError",
    "EvaluationError",
]


class OmnimergeError(Exception):
    """Base class of every error omnimerge raises deliberately."""


class RecipeError(OmnimergeError, ValueError):
    """A recipe (or sweep file) is invalid. ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: list[str] | str, *, path: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.path = path
        where = f"Recipe '{path}'" if path else "Recipe"
        if len(self.problems) == 1:
            msg = f"{where} is invalid: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"{where} has {len(self.problems)} problems:\n{lines}"
        super().__init__(msg)


class SourceError(OmnimergeError, ValueError):
    """A model source (directory, hub id, adapter) cannot be used as given."""


class SourceNotFoundError(OmnimergeError, FileNotFoundError):
    """A model source or one of its files does not exist."""


class UnsafeCheckpointError(SourceError):
    """Pickle weights, remote code or an index that points outside the model directory."""


class TensorMismatchError(OmnimergeError, ValueError):
    """Experts disagree with the base on tensor names, shapes or dtypes."""


class NonFiniteError(OmnimergeError, ValueError):
    """An input tensor of a merged tensor holds NaN or Inf."""


class PlanError(OmnimergeError, ValueError):
    """The plan cannot be made (coverage, shard layout, memory)."""


class OutputExistsError(OmnimergeError, FileExistsError):
    """The output directory exists and --overwrite was not given."""


class ResumeError(OmnimergeError, RuntimeError):
    """A staging directory belongs to a different recipe or different inputs."""


class ShardJobError(OmnimergeError, RuntimeError):
    """A ShardJob failed; the message names the shard, the tensor and the recipe."""


class EvaluationError(OmnimergeError, RuntimeError):
    """An evaluation could not run (missing data, model that does not load)."""
