"""The scheduler API: :class:`SchedulerMixin` (loading and saving a config, the run's host timesteps),
:class:`SchedulerOutput` (what ``step`` returns) and :class:`StepIndexMixin` (where a run stands, for the
schedulers that step through a table of noise levels).

A scheduler's configuration is its constructor (DESIGN.md, decision 7) and is saved as
``scheduler_config.json`` with diffusers' keys, so either library loads the other's file (decision 4);
the classes whose configs a scheduler also reads are its ``_compatibles`` (:mod:`.registry`).

Limits: ``step_index``/``begin_index`` follow diffusers' rules, except that a timestep not in the
schedule raises ValueError where diffusers raises IndexError or takes the last step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

import torch

from ..configuration import ConfigMixin
from ..utils.outputs import BaseOutput

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

S = TypeVar("S", bound="SchedulerMixin")


@dataclasses.dataclass
class SchedulerOutput(BaseOutput):
    """What ``step`` returns.

    Attributes:
        prev_sample: x_{t-1} (or the next sample of the run), the model's next input.
        pred_original_sample: the clipped or thresholded x0 predicted at this step; None for
            schedulers that do not form it (PNDM).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class SchedulerMixin(ConfigMixin):
    """Base of all schedulers: configuration, ``from_pretrained`` and ``save_pretrained``."""

    config_name = SCHEDULER_CONFIG_NAME
    has_compatibles = True

    @classmethod
    def from_pretrained(cls: type[S], pretrained_model_name_or_path: str | os.PathLike,
                        subfolder: str | None = None, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, **overrides: Any) -> S:
        """Build the scheduler from ``scheduler_config.json`` in a directory or Hub repo.

        The file may come from any compatible scheduler of either library; ``overrides`` replace
        config values (``DDIMScheduler.from_pretrained(repo, subfolder="scheduler",
        timestep_spacing="trailing")``).
        """
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, revision=revision,
                                 cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        return cls.from_config(config, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``scheduler_config.json`` into ``save_directory``, atomically."""
        self.save_config(save_directory)

    @property
    def host_timesteps(self) -> torch.Tensor:
        """The run's ``timesteps`` on the CPU, for stepping without reading the device: a copy kept
        when they were set (made anew, with a device read, only if ``timesteps`` was replaced)."""
        cached = self.__dict__.get("_host_timesteps")
        if cached is None or cached[0] is not self.timesteps:
            cached = self._host_timesteps = (self.timesteps, self.timesteps.detach().cpu())
        return cached[1]

    def _set_run_timesteps(self, timesteps: torch.Tensor, device: str | torch.device | None = None) -> None:
        """Install the run's ``timesteps`` (a CPU tensor) on ``device``, keeping the CPU copy
        (:attr:`host_timesteps`) so that a sampling loop never reads them back from the device."""
        self.timesteps = timesteps.to(device)
        self._host_timesteps = (self.timesteps, timesteps)

    @property
    def compatibles(self) -> list[type]:
        """This class and the fusediff scheduler classes that can be built from its config."""
        import fusediff

        found = [getattr(fusediff, name, None) for name in (type(self).__name__, *self._compatibles)]
        return [c for c in found if isinstance(c, type)]


class StepIndexMixin:
    """Where a run stands, for schedulers that step through a table of noise levels (the sigma-based
    and multistep ones): the index of the next step, and the index a pipeline starts at (img2img).

    ``_begin_index_limit`` is the largest index ``set_begin_index`` accepts (None: no upper bound).
    """

    timesteps: torch.Tensor
    _step_index: int | None
    _begin_index: int | None

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next step; None until the first step of a run."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index the run starts at, when a pipeline set one with ``set_begin_index``; else None."""
        return self._begin_index

    def _begin_index_limit(self) -> int | None:
        return len(self.timesteps) - 1

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]`` (img2img); call after ``set_timesteps``."""
        limit = self._begin_index_limit()
        if (isinstance(begin_index, bool) or int(begin_index) != begin_index or begin_index < 0
                or (limit is not None and begin_index > limit)):
            where = "a non-negative integer" if limit is None else f"an integer in [0, {limit}]"
            raise ValueError(f"begin_index must be {where}; got {begin_index!r}")
        self._begin_index = int(begin_index)

    def _noise_indices(self, timesteps: torch.Tensor, device: torch.device) -> list[int]:
        """add_noise's index into the run's noise levels per timestep: the run's begin index (img2img,
        before the first step) or current index (inpainting, after it) when a pipeline set one, else
        each timestep's position in the schedule (training)."""
        if self._begin_index is None:
            schedule = self.timesteps.to(device)
            return [self.index_for_timestep(t, schedule) for t in timesteps.to(device)]
        index = self._begin_index if self._step_index is None else self._step_index
        return [index] * len(timesteps)

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule; the second where it occurs twice (Heun's doubled
        table, or a run entered mid-schedule), so that no noise level is skipped. Raises ValueError
        if it is not there."""
        schedule = self.host_timesteps if schedule_timesteps is None else schedule_timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule.device)  # a device read when a device timestep meets the host table
        hits = (schedule == timestep).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(timestep)} is not in the schedule ({len(schedule)} timesteps from "
                             f"{float(schedule[0])} to {float(schedule[-1])}); pass one of scheduler.timesteps")
        return int(hits[1 if len(hits) > 1 else 0])
