"""Denoiser: a diffusers backbone (through its adapter) + conditioning + noise schedule behind one interface.

Teacher, student and any critic are Denoisers. Where the student is a LoRA, all of them share one frozen base
network and differ only in which adapter is active (None = the plain base, i.e. the teacher).
"""
from __future__ import annotations

import contextlib

import torch

from .backbones import Backbone, Conditioning, backbone_for, guidance_scale_embedding  # noqa: F401 (re-exported)
from .schedule import NoiseSchedule


@contextlib.contextmanager
def adapter_scope(module, adapter: str | None):
    """Run `module` with only `adapter` active (None: no adapter, the frozen base); the previous state is restored.

    Sets the LoRA layers' active/disabled state directly. peft's public `set_adapter` / `enable_adapters` also
    rewrite every parameter's requires_grad (switching to the teacher mid-step would freeze the student) and
    cost tens of milliseconds per switch, where DMD switches about ten times per training step.
    """
    layers = _tuner_layers(module)
    if not layers:
        if adapter is not None:
            raise ValueError(f"adapter '{adapter}' requested but the network has no adapters")
        yield
        return
    if adapter is not None and adapter not in module.peft_config:
        raise ValueError(f"adapter '{adapter}' requested; the network has {sorted(module.peft_config)}")
    saved = _adapter_states(layers)
    wanted = [(active, True) for active, _ in saved] if adapter is None else [([adapter], False) for _ in saved]
    try:
        _set_adapter_states(layers, wanted)
        yield
    finally:
        _set_adapter_states(layers, saved)


def _adapter_states(layers) -> list[tuple]:
    return [(vars(layer)["_active_adapter"], vars(layer)["_disable_adapters"]) for layer in layers]


def _set_adapter_states(layers, states) -> None:
    # Plain instance attributes of peft's layers, written to the instance dict: nn.Module.__setattr__'s checks,
    # over every LoRA layer at every switch, were most of what a switch cost.
    for layer, (active, disabled) in zip(layers, states):
        attrs = vars(layer)
        attrs["_active_adapter"], attrs["_disable_adapters"] = active, disabled


def enable_gradient_checkpointing(module) -> None:
    """diffusers' gradient checkpointing, with each block recomputed under the adapters that were active in its
    forward pass. The backward pass runs after `adapter_scope` has exited, so plain checkpointing would recompute
    a fake score's (or a student's) blocks with whatever adapter is active then: silently wrong gradients."""
    import torch.utils.checkpoint as ckpt

    layers = _tuner_layers(module)

    def restoring(state):
        @contextlib.contextmanager
        def scope():
            saved = _adapter_states(layers)
            _set_adapter_states(layers, state)
            try:
                yield
            finally:
                _set_adapter_states(layers, saved)
        return scope()

    def checkpoint(module, *args):
        state = _adapter_states(layers)  # at forward time
        return ckpt.checkpoint(module.__call__, *args, use_reentrant=False,
                               context_fn=lambda: (contextlib.nullcontext(), restoring(state)))

    module.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


def _tuner_layers(module) -> list:
    """The LoRA layers of `module`, found once per set of adapters: walking every module at every adapter switch
    cost more than the switch itself, and a DMD step switches about ten times."""
    if not getattr(module, "_hf_peft_config_loaded", False):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(sorted(getattr(module, "peft_config", {})))
    cached = module.__dict__.get("_stepdistill_tuner_layers")
    if cached is None or cached[0] != key:
        cached = (key, [m for m in module.modules() if isinstance(m, BaseTunerLayer)])
        module.__dict__["_stepdistill_tuner_layers"] = cached
    return cached[1]


class Denoiser:
    """Predicts x0 / eps / v from (x_t, t, conditioning) in the teacher's noise schedule.

    t is schedule time (`NoiseSchedule`: 0..T-1, T-1 the noisiest); the schedule turns it into the timestep the
    family's scheduler would hand the network, and the backbone adapter makes the network's own call.
    `net` is what is called (possibly a DDP wrapper), `module` the bare network (config, adapters, taps).
    """

    def __init__(self, net, schedule: NoiseSchedule, *, module=None, adapter: str | None = None,
                 prediction_type: str | None = None, backbone: Backbone | None = None):
        self.net = net
        self.module = module if module is not None else net
        self.schedule = schedule
        self.adapter = adapter
        self.prediction_type = prediction_type or schedule.prediction_type
        self.backbone = backbone or backbone_for(self.module)

    @property
    def takes_guidance(self) -> bool:
        """The network has a guidance input (an embedded-guidance student, Flux-dev): pass w."""
        return self.backbone.guidance_input(self.module) is not None

    @property
    def has_guidance_embedding(self) -> bool:
        """A student's own LCM-style guidance embedding (UNet `time_cond_proj_dim`), not a family's input."""
        return self.backbone.guidance_input(self.module) == "embedding"

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 w: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output, in this denoiser's parameterization."""
        dtype = next(self.module.parameters()).dtype  # ModelMixin.dtype scans every parameter
        timestep = self.schedule.timestep(t)  # as the pipeline passes it: not cast to the network's dtype
        with adapter_scope(self.module, self.adapter):
            out = self.backbone.predict(self.net, self.module, x_t.to(dtype), timestep,
                                        cond.map(lambda v: _cast(v, dtype)), w)
        return out.to(x_t.dtype)

    def x0_eps(self, x_t, t, cond, w=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.to_x0_eps(self(x_t, t, cond, w), x_t, t, self.prediction_type)

    def guided_x0_eps(self, x_t, t, cond: Conditioning, uncond: Conditioning, scale: torch.Tensor | float):
        """Classifier-free guidance in one batched call: pred = uncond + scale * (cond - uncond).

        `scale` is a float or a per-sample tensor; scale = 1 is the plain conditional prediction. A
        guidance-distilled network (Flux-dev) takes the scale as its input instead: one call, w = scale - 1. A family
        whose pipeline guides otherwise (Backbone.nonlinear_guidance) combines the raw outputs by its own rule.
        """
        if self.backbone.guidance_input(self.module) == "scale":
            w = torch.as_tensor(scale, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0]) - 1
            return self.x0_eps(x_t, t, cond, w)
        s = torch.as_tensor(scale, dtype=x_t.dtype, device=x_t.device).reshape(-1, *([1] * (x_t.ndim - 1)))
        if self.backbone.nonlinear_guidance:  # the pipeline's own rule on the outputs (Qwen-Image's rescaled CFG)
            out_c, out_u = self(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.cat(uncond)).chunk(2)
            return self.schedule.to_x0_eps(self.backbone.guide(out_c, out_u, s), x_t, t, self.prediction_type)
        x0, eps = self.x0_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.cat(uncond))
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        return x0_u + s * (x0_c - x0_u), eps_u + s * (eps_c - eps_u)


    # --- feature taps (discriminator heads read intermediate activations) --------------------------------
    def features(self, x_t, t, cond: Conditioning, taps: list[str]) -> list[torch.Tensor]:
        """The outputs of the modules named in `taps` (e.g. "mid_block", "transformer_blocks.3") as (B, C, h, w)
        maps, in that order, fp32.

        The network stops as soon as the last of them has run, so a tap of a UNet's encoder half never runs its
        decoder. Gradients flow to `x_t` and to whatever requires grad in the network (freeze what should not
        learn, `gan.frozen`)."""
        with self.recording(taps, x_t.shape, stop=True) as found:
            try:
                self(x_t, t, cond)
            except _TapsComplete:
                pass
        missing = [name for name, value in zip(taps, found) if value is None]
        if missing:
            raise ValueError(f"feature taps {missing} never ran in {type(self.module).__name__}")
        return found

    def recording(self, taps: list[str], latent_shape, stop: bool = False):
        """`recording_features` on this network, each output turned into a map by the backbone adapter."""
        hw = tuple(latent_shape[-2:])
        return recording_features(self.module, taps, stop,
                                  transform=lambda out: self.backbone.feature_map(self.module, out, hw))


class _TapsComplete(Exception):
    """Raised by the last tap's hook: the rest of the network is not needed."""


@contextlib.contextmanager
def recording_features(module, taps: list[str], stop: bool = False, transform=None):
    """Records, in a list ordered like `taps`, the output of each named submodule of `module` at its last forward
    inside (through `transform`, else a tuple output's first element), as fp32. With `stop`, the forward pass is
    cut short (raises _TapsComplete) once every tap has run."""
    found: list = [None] * len(taps)
    seen: set[int] = set()
    pick = transform or (lambda out: out[0] if isinstance(out, tuple) else out)

    def hook_for(i):
        def hook(_, args, output):
            found[i] = pick(output).float()
            seen.add(i)
            if stop and len(seen) == len(taps):
                raise _TapsComplete
        return hook

    try:
        handles = [module.get_submodule(name).register_forward_hook(hook_for(i)) for i, name in enumerate(taps)]
    except AttributeError as err:
        raise ValueError(f"no feature tap {err} in {type(module).__name__}") from None
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def default_feature_taps(module) -> list[str]:
    """Where a discriminator reads a backbone by default (its adapter's `feature_taps`)."""
    return backbone_for(module).feature_taps(module)


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
