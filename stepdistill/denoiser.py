"""Denoiser: a diffusers backbone + conditioning + noise schedule behind one interface.

Teacher, student and any critic are Denoisers. Where the student is a LoRA, all of them share one frozen base
UNet and differ only in which adapter is active (None = the plain base, i.e. the teacher).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch

from .schedule import NoiseSchedule


@dataclass
class Conditioning:
    """Text conditioning for a batch, in the form the UNet takes it."""

    embeds: torch.Tensor  # (B, L, D) encoder_hidden_states
    pooled: torch.Tensor | None = None  # SDXL: pooled text embeddings
    time_ids: torch.Tensor | None = None  # SDXL: (original size, crop, target size)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def map(self, fn) -> "Conditioning":
        return replace(self, embeds=fn(self.embeds),
                       pooled=None if self.pooled is None else fn(self.pooled),
                       time_ids=None if self.time_ids is None else fn(self.time_ids))

    def cat(self, other: "Conditioning") -> "Conditioning":
        return Conditioning.concat([self, other])

    @staticmethod
    def concat(rows: list["Conditioning"]) -> "Conditioning":
        """One Conditioning of all rows, in order (one torch.cat per field, not one per row)."""
        def join(name):
            return None if getattr(rows[0], name) is None else torch.cat([getattr(r, name) for r in rows])

        return Conditioning(join("embeds"), join("pooled"), join("time_ids"))

    def __len__(self) -> int:
        return self.embeds.shape[0]


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight, as diffusers' LCM pipelines compute it (w scaled by 1000)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


@contextlib.contextmanager
def adapter_scope(unet, adapter: str | None):
    """Run `unet` with only `adapter` active (None: no adapter, the frozen base); the previous state is restored.

    Sets the LoRA layers' active/disabled state directly. peft's public `set_adapter` / `enable_adapters` also
    rewrite every parameter's requires_grad (switching to the teacher mid-step would freeze the student) and
    cost tens of milliseconds per switch, where DMD switches about ten times per training step.
    """
    layers = _tuner_layers(unet)
    if not layers:
        if adapter is not None:
            raise ValueError(f"adapter '{adapter}' requested but the UNet has no adapters")
        yield
        return
    if adapter is not None and adapter not in unet.peft_config:
        raise ValueError(f"adapter '{adapter}' requested; the UNet has {sorted(unet.peft_config)}")
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


def enable_gradient_checkpointing(unet) -> None:
    """diffusers' gradient checkpointing, with each block recomputed under the adapters that were active in its
    forward pass. The backward pass runs after `adapter_scope` has exited, so plain checkpointing would recompute
    a fake score's (or a student's) blocks with whatever adapter is active then: silently wrong gradients."""
    import torch.utils.checkpoint as ckpt

    layers = _tuner_layers(unet)

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

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


def _tuner_layers(unet) -> list:
    """The LoRA layers of `unet`, found once per set of adapters: walking every module at every adapter switch
    cost more than the switch itself, and a DMD step switches about ten times."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(sorted(getattr(unet, "peft_config", {})))
    cached = unet.__dict__.get("_stepdistill_tuner_layers")
    if cached is None or cached[0] != key:
        cached = (key, [m for m in unet.modules() if isinstance(m, BaseTunerLayer)])
        unet.__dict__["_stepdistill_tuner_layers"] = cached
    return cached[1]


class Denoiser:
    """Predicts x0 / eps / v from (x_t, t, conditioning) in the teacher's noise schedule.

    `net` is what is called (possibly a DDP wrapper), `unet` the bare module (for config and adapters).
    """

    def __init__(self, net, schedule: NoiseSchedule, *, unet=None, adapter: str | None = None,
                 prediction_type: str | None = None):
        self.net = net
        self.unet = unet if unet is not None else net
        self.schedule = schedule
        self.adapter = adapter
        self.prediction_type = prediction_type or schedule.prediction_type

    @property
    def guidance_embedding_dim(self) -> int | None:
        return getattr(self.unet.config, "time_cond_proj_dim", None)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 w: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output, in this denoiser's parameterization."""
        kwargs = cond.unet_kwargs()
        if self.guidance_embedding_dim is not None:
            if w is None:
                raise ValueError("this network has a guidance embedding: pass the guidance weight w")
            kwargs["timestep_cond"] = guidance_scale_embedding(w, self.guidance_embedding_dim).to(x_t)
        dtype = next(self.unet.parameters()).dtype  # ModelMixin.dtype scans every parameter
        with adapter_scope(self.unet, self.adapter):
            out = self.net(x_t.to(dtype), t, **{k: _cast(v, dtype) for k, v in kwargs.items()}).sample
        return out.to(x_t.dtype)

    def x0_eps(self, x_t, t, cond, w=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.to_x0_eps(self(x_t, t, cond, w), x_t, t, self.prediction_type)

    def guided_x0_eps(self, x_t, t, cond: Conditioning, uncond: Conditioning, scale: torch.Tensor | float):
        """Classifier-free guidance in one batched call: pred = uncond + scale * (cond - uncond).

        `scale` is a float or a per-sample tensor; scale = 1 is the plain conditional prediction.
        """
        x0, eps = self.x0_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.cat(uncond))
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        s = torch.as_tensor(scale, dtype=x_t.dtype, device=x_t.device).reshape(-1, *([1] * (x_t.ndim - 1)))
        return x0_u + s * (x0_c - x0_u), eps_u + s * (eps_c - eps_u)


    # --- feature taps (discriminator heads read intermediate activations) --------------------------------
    def features(self, x_t, t, cond: Conditioning, taps: list[str]) -> list[torch.Tensor]:
        """The outputs of the modules named in `taps` (e.g. "mid_block", "down_blocks.1"), in that order, fp32.

        The network stops as soon as the last of them has run, so a tap of a UNet's encoder half never runs its
        decoder. Gradients flow to `x_t` and to whatever requires grad in the network (freeze what should not
        learn, `gan.frozen`)."""
        with recording_features(self.unet, taps, stop=True) as found:
            try:
                self(x_t, t, cond)
            except _TapsComplete:
                pass
        missing = [name for name, value in zip(taps, found) if value is None]
        if missing:
            raise ValueError(f"feature taps {missing} never ran in {type(self.unet).__name__}")
        return found


class _TapsComplete(Exception):
    """Raised by the last tap's hook: the rest of the network is not needed."""


@contextlib.contextmanager
def recording_features(module, taps: list[str], stop: bool = False):
    """Records, in a list ordered like `taps`, the output of each named submodule of `module` at its last forward
    inside (a tuple output's first element: UNet down blocks return (hidden states, skip connections)). With
    `stop`, the forward pass is cut short (raises _TapsComplete) once every tap has run."""
    found: list = [None] * len(taps)
    seen: set[int] = set()

    def hook_for(i):
        def hook(_, args, output):
            found[i] = (output[0] if isinstance(output, tuple) else output).float()
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


def default_feature_taps(net) -> list[str]:
    """Where a discriminator reads a backbone by default: a UNet's every down block and its mid block (LADD reads
    several depths of the frozen teacher); a transformer's blocks."""
    if hasattr(net, "down_blocks") and hasattr(net, "mid_block"):
        return [f"down_blocks.{i}" for i in range(len(net.down_blocks))] + ["mid_block"]
    blocks = getattr(net, "transformer_blocks", None)
    if blocks is not None:
        n = len(blocks)
        return [f"transformer_blocks.{i}" for i in sorted({n // 4, n // 2, 3 * n // 4, n - 1})]
    raise ValueError(f"no default feature taps for {type(net).__name__}; name them (e.g. objective.options.taps)")


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
