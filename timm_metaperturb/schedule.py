"""Schedules that follow training on their own, so that a user's loop needs no call to anneal them.

What is attached to a network (MetaPerturb, a baseline regularizer) counts the network's training steps in a buffer,
`steps_taken`, so that a checkpoint of the network restores the count, and with it the schedule, exactly. A step is
one call of any torch optimizer's `step()` in which at least one of the network's own parameters (not those of the
attached module: meta-training's step on φ does not count) has a gradient. So:

- gradient accumulation counts one step per optimizer step, however many forward and backward passes precede it
  (Accelerate's `accumulate` calls the wrapped optimizer's `step()` only when gradients synchronise);
- several forward passes before one step count once;
- evaluation in between (eval mode, or `torch.no_grad()`) counts nothing and changes nothing;
- a step a `GradScaler` skips (gradients not finite) is not taken, so it is not counted;
- two optimizers that each update part of the network count two steps: give such a loop's total accordingly.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

_scheduled: weakref.WeakSet[Scheduled] = weakref.WeakSet()  # every live Scheduled module, copies included
_optimizer_hook = None
_registrations = 0  # parameters and submodules registered on any module so far: a network may have changed


def _count_registration(*args) -> None:
    global _registrations
    _registrations += 1


register_module_parameter_registration_hook(_count_registration)
register_module_module_registration_hook(_count_registration)


class Scheduled(nn.Module):
    """A module with a training schedule: `set_progress(step, total_steps)` is called whenever its count of the
    network's training steps advances, once `schedule(total_steps)` has given the length of training."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.int64))
        self.total_steps: int | None = None
        self._steps_taken = 0  # the buffer's value, read without a device synchronisation
        self._network_params: list[nn.Parameter] = []  # a plain list: copies and pickles map it to their own
        self._watched_at = -1  # `_registrations` when `_network_params` was taken
        self.register_load_state_dict_post_hook(Scheduled._after_load)
        _register(self)

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and unpickling
        super().__setstate__(state)
        _register(self)

    def watch(self, network: nn.Module) -> None:
        """Count the steps of the optimizers that update `network`'s parameters (other than this module's)."""
        own = {id(p) for p in self.parameters()}
        self._network_params = [p for p in network.parameters() if id(p) not in own]
        self._watched_at = _registrations

    def set_progress(self, step: int, total_steps: int) -> None:
        """Where training stands (`step` of `total_steps`), before each training step."""

    def schedule(self, total_steps: int | None) -> None:
        """Follow a schedule over `total_steps` optimizer steps from now on (None: no schedule)."""
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) != total_steps
                                        or total_steps < 1):  # fmt: skip
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total_steps!r}")
        self.total_steps = None if total_steps is None else int(total_steps)
        self._report()

    def advance(self) -> None:
        """Count one training step of the network."""
        self._steps_taken += 1
        with torch.no_grad():
            self.steps_taken.add_(1)
        self._report()

    def _report(self) -> None:
        if self.total_steps is not None:
            self.set_progress(self._steps_taken, self.total_steps)

    def _after_load(self, incompatible_keys) -> None:
        self._steps_taken = int(self.steps_taken)
        self._report()


class WatchNetwork:
    """Forward pre-hook on the network: a training forward after any module registered a parameter or submodule
    refreshes which parameters are the network's, so that a classifier replaced after attaching counts too (other
    forwards only compare a counter). Skipped inside torch.compile, where it would break the graph (the parameters
    known from attaching, or the last eager forward, count)."""

    def __init__(self, owner: Scheduled) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, args) -> None:
        if torch.compiler.is_compiling() or not module.training or self.owner._watched_at == _registrations:
            return
        self.owner.watch(module)


def _register(module: Scheduled) -> None:
    global _optimizer_hook
    _scheduled.add(module)
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_after_optimizer_step)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    updated = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    for module in list(_scheduled):
        if any(id(p) in updated for p in module._network_params):
            module.advance()
