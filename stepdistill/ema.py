"""Exponential moving average of a module's trained parameters."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Keeps `shadow`, a frozen copy of `module` whose trained parameters track an EMA of the live ones.

    Only parameters that require grad are averaged (for a LoRA student: the adapter weights); the rest of
    the shadow is the same frozen base. Checkpointed through state_dict / load_state_dict.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        live = dict(module.named_parameters())
        shadow = dict(self.shadow.named_parameters())
        for n in self.names:
            shadow[n].lerp_(live[n].detach().to(shadow[n].dtype), 1.0 - self.decay)

    def state_dict(self) -> dict:
        shadow = dict(self.shadow.named_parameters())
        return {"decay": self.decay, "params": {n: shadow[n].detach().clone() for n in self.names}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = dict(self.shadow.named_parameters())
        if set(state["params"]) != set(self.names):
            raise ValueError("EMA state does not match the model's trained parameters")
        for n, v in state["params"].items():
            shadow[n].copy_(v)
