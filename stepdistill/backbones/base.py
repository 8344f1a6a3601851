"""What every backbone adapter provides, and the conditioning they all take.

The Denoiser, the objectives, export and sampling see latents (B, C, H, W), a schedule time t and a
Conditioning. An adapter turns those into its network's own call (argument names, timestep convention, latent
packing, guidance input) and back, encodes prompts with its pipeline's own code, and knows the few facts about
its family that the rest of stepdistill needs (latent normalisation, VAE factor, LoRA targets and file names,
where discriminator heads read features). diffusers owns the models; an adapter is only a calling convention.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Conditioning:
    """Text conditioning for a batch, in the form the backbone takes it."""

    embeds: torch.Tensor  # (B, L, D) text tokens the network attends to
    pooled: torch.Tensor | None = None  # pooled text embedding: SDXL text_embeds, SD3 / Flux pooled_projections
    time_ids: torch.Tensor | None = None  # SDXL: (original size, crop, target size)
    mask: torch.Tensor | None = None  # (B, L) attention mask of `embeds` (Sana, PixArt, Qwen-Image)
    # (B, L) how many identical text tokens each token of `embeds` stands for (SD3 without T5: its 256 all-zero
    # "T5" tokens as one, attended with + log 256, the same softmax); None: one each
    repeats: torch.Tensor | None = None

    def map(self, fn) -> "Conditioning":
        return replace(self, **{f.name: fn(v) for f in fields(self) if (v := getattr(self, f.name)) is not None})

    def cat(self, other: "Conditioning") -> "Conditioning":
        return Conditioning.concat([self, other])

    def padded(self, length: int) -> "Conditioning":
        """The text zero-padded to `length` tokens, masked out (a masked token changes no image token)."""
        pad = length - self.embeds.shape[1]
        if pad == 0:
            return self
        if self.mask is None:
            raise ValueError("conditionings of different text lengths need attention masks to be joined")
        repeats = None if self.repeats is None else torch.nn.functional.pad(self.repeats, (0, pad), value=1.0)
        return replace(self, embeds=torch.nn.functional.pad(self.embeds, (0, 0, 0, pad)),
                       mask=torch.nn.functional.pad(self.mask, (0, pad)), repeats=repeats)

    @staticmethod
    def concat(rows: list["Conditioning"]) -> "Conditioning":
        """One Conditioning of all rows, in order (one torch.cat per field, not one per row). Rows of different
        text lengths (Qwen-Image encodes a batch at its longest prompt's length) are padded to the longest."""
        longest = max(r.embeds.shape[1] for r in rows)
        rows = [r.padded(longest) for r in rows]

        def join(name):
            return None if getattr(rows[0], name) is None else torch.cat([getattr(r, name) for r in rows])

        return Conditioning(**{f.name: join(f.name) for f in fields(Conditioning)})

    def __len__(self) -> int:
        return self.embeds.shape[0]


def kohya_lora_layers(net, adapter: str, prefix: str) -> dict[str, torch.Tensor]:
    """`<prefix><module path with _>` keys with lora_down / lora_up and each module's true alpha."""
    from peft.tuners.lora import LoraLayer

    from ..errors import StepdistillError

    out = {}
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = prefix + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = module.lora_A[adapter].weight.detach().float().cpu().contiguous()
            out[f"{key}.lora_up.weight"] = module.lora_B[adapter].weight.detach().float().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(module.lora_alpha[adapter]))
    if not out:
        raise StepdistillError("the student has no LoRA adapter to export; use --format full")
    return out


class Backbone:
    """One kind of diffusers network (UNet2DConditionModel, SD3Transformer2DModel, ...).

    Subclasses set the class attributes and implement `predict` and `encode_prompt`; the rest has defaults
    that fit most transformers."""

    kind: str = "?"
    network_class: str = "?"  # the diffusers class of the network
    component: str = "transformer"  # the pipeline's attribute and folder name for the network
    pipelines: tuple[str, ...] = ()  # diffusers pipeline classes whose network this is
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    kohya_prefix: str | None = None  # kohya key prefix where the family has that LoRA convention
    kohya_readers: str = "ComfyUI and A1111"  # who reads the family's kohya file (the export's model card says)

    def kohya_state_dict(self, net, adapter: str) -> dict[str, torch.Tensor]:
        """The kohya / sd-scripts LoRA file (`export.KOHYA_FILE`) of `net`'s `adapter`, for a family with a
        `kohya_prefix`: `<prefix><module path with _>` keys with lora_down / lora_up and each module's alpha (kohya's
        naming on diffusers module paths, which ComfyUI, A1111 and diffusers' kohya converter read for UNets).
        Families whose kohya files name another layout (Flux: the BFL reference model's) override this."""
        return kohya_lora_layers(net, adapter, self.kohya_prefix)

    # --- calling the network ------------------------------------------------------------------------------
    def predict(self, net, module, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                guidance: torch.Tensor | None) -> torch.Tensor:
        """The network's raw output for latents x (B, C, H, W) at diffusers scheduler timesteps `timestep` (B,),
        shaped like x: the adapter converts the timestep as its pipeline does (UNets and SD3 take it as it is,
        Flux sigma = timestep / 1000). `net` is what is called (possibly a DDP wrapper), `module` the bare
        network."""
        raise NotImplementedError

    # classifier-free guidance: False where the pipeline's rule is not uncond + s (cond - uncond) on the network
    # output, which the Denoiser then applies to x0 and eps directly (the same, for a linear rule)
    nonlinear_guidance: bool = False

    def guide(self, out_c: torch.Tensor, out_u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The pipeline's classifier-free guidance of raw outputs (B, C, H, W), scale (B, 1, 1, 1)."""
        return out_u + scale * (out_c - out_u)

    def pipeline_guidance(self, guidance_scale: float, batch: int) -> dict:
        """The pipeline call's keyword arguments for stepdistill's guidance scale g (pred = uncond + g (cond -
        uncond); 1 is none) on a batch of `batch` prompts."""
        return {"guidance_scale": guidance_scale}

    def guidance_input(self, module) -> str | None:
        """How the network takes a guidance weight: None (it does not), "embedding" (an LCM-style
        `time_cond_proj_dim` embedding a student was given) or "scale" (Flux-dev's guidance-distilled input)."""
        return None

    # --- facts about the network --------------------------------------------------------------------------
    def latent_channels(self, module) -> int:
        return int(module.config.in_channels)

    def downsampling(self, module) -> int:
        """The factor by which the network's latent size must be divisible (patch size, UNet down blocks)."""
        return int(getattr(module.config, "patch_size", 1) or 1)

    def feature_taps(self, module) -> list[str]:
        """Where a discriminator reads the network by default: blocks at a quarter, half, three quarters and
        the end of the depth (LADD reads several depths of the frozen teacher)."""
        blocks = getattr(module, "transformer_blocks", None)
        if blocks is None:
            raise ValueError(f"no default feature taps for {type(module).__name__}; name them "
                             "(objective.options.taps)")
        n = len(blocks)
        return [f"transformer_blocks.{i}" for i in sorted({n // 4, n // 2, 3 * n // 4, n - 1})]

    def feature_map(self, module, output, latent_hw: tuple[int, int]) -> torch.Tensor:
        """A tap's output as a (B, C, h, w) map: a block's image tokens (B, h * w, C) laid out on the latent grid
        the patch embedding made (a tuple output's last element, the image stream of two-stream blocks)."""
        tokens = output[-1] if isinstance(output, tuple) else output
        p = self.downsampling(module)
        h, w = latent_hw[0] // p, latent_hw[1] // p
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    # --- the pipeline around it ---------------------------------------------------------------------------
    def encode_prompt(self, pipe, prompts: list[str], resolution: int | None) -> Conditioning:
        """The conditioning the family's pipeline computes for `prompts` (its own `encode_prompt`)."""
        raise NotImplementedError

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Initial noise (B, C, h, w) in the layout the pipeline's `latents=` argument takes."""
        return latents

    def text_encoders(self, pipe) -> list:
        return [m for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if (m := getattr(pipe, name, None)) is not None]

    def image_vae(self, vae):
        """The VAE as the trainer and objectives call it (Teacher.vae), AutoencoderKL's way: encode(pixels (B, 3,
        H, W)).latent_dist.sample(generator=) and decode(z (B, C, h, w)).sample. Default: the pipeline's own VAE."""
        return vae

    def vae_factor(self, vae) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def latent_norm(self, vae) -> tuple:
        """(scale, shift): the network sees (vae latent - shift) * scale, as the pipeline decodes z / scale + shift;
        floats, or tensors (C, 1, 1) for per-channel statistics (Qwen-Image's latents_std / latents_mean)."""
        return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


class ImageVAE(torch.nn.Module):
    """A family's VAE behind AutoencoderKL's image calling convention (`Backbone.image_vae`); subclasses implement
    encode and decode. The pipeline, and exports, keep the VAE itself (`vae`)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @property
    def config(self):
        return self.vae.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device
