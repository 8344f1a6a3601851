"""FluxTransformer2DModel: Flux.1 dev / schnell (MMDiT double + single-stream blocks, rectified flow)."""
from __future__ import annotations

import torch

from ..errors import StepdistillError
from .base import Backbone, Conditioning


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, row-major over the packed grid (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents (B, C, h, w) (FluxPipeline._unpack_latents)."""
    b, _, c4 = x.shape
    return x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) rotary position ids [0, row, col] of the packed grid (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def bfl_linears(net) -> dict[str, list[str]]:
    """The BFL name (Flux's reference code, whose module names kohya / sd-scripts LoRA keys, ComfyUI and Forge use) of
    every linear layer of a FluxTransformer2DModel, with the diffusers linears it is made of: where BFL fuses
    several (q, k, v; a single block's q, k, v and MLP input), its output rows are theirs, stacked in this order.
    Only final_layer.adaLN_modulation.1 reorders rows: diffusers' norm_out.linear gives (scale, shift), BFL's
    (shift, scale). The same correspondence as diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    out = {}
    for i in range(len(net.transformer_blocks)):
        d, b = f"transformer_blocks.{i}.", f"double_blocks_{i}_"
        out.update({b + "img_attn_qkv": [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"],
                    b + "img_attn_proj": [d + "attn.to_out.0"],
                    b + "img_mlp_0": [d + "ff.net.0.proj"], b + "img_mlp_2": [d + "ff.net.2"],
                    b + "img_mod_lin": [d + "norm1.linear"],
                    b + "txt_attn_qkv": [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
                    b + "txt_attn_proj": [d + "attn.to_add_out"],
                    b + "txt_mlp_0": [d + "ff_context.net.0.proj"], b + "txt_mlp_2": [d + "ff_context.net.2"],
                    b + "txt_mod_lin": [d + "norm1_context.linear"]})
    for i in range(len(net.single_transformer_blocks)):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks_{i}_"
        out.update({b + "linear1": [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"],
                    b + "linear2": [d + "proj_out"], b + "modulation_lin": [d + "norm.linear"]})
    emb = "time_text_embed."
    out.update({"img_in": ["x_embedder"], "txt_in": ["context_embedder"],
                "time_in_in_layer": [emb + "timestep_embedder.linear_1"],
                "time_in_out_layer": [emb + "timestep_embedder.linear_2"],
                "vector_in_in_layer": [emb + "text_embedder.linear_1"],
                "vector_in_out_layer": [emb + "text_embedder.linear_2"],
                "final_layer_linear": ["proj_out"], "final_layer_adaLN_modulation_1": ["norm_out.linear"]})
    if hasattr(net.time_text_embed, "guidance_embedder"):  # Flux-dev; schnell has none
        out.update({"guidance_in_in_layer": [emb + "guidance_embedder.linear_1"],
                    "guidance_in_out_layer": [emb + "guidance_embedder.linear_2"]})
    return out


# diffusers' sd-scripts converter copies these two modules' lora_down / lora_up without their alpha (scale 1): the
# export folds the scale into lora_up and writes alpha = rank, which every reader then takes as it is
_FOLDED_SCALE = ("final_layer_linear", "final_layer_adaLN_modulation_1")


class FluxBackbone(Backbone):
    """FluxPipeline's transformer call, for unpacked latents x (B, C, h, w), C = in_channels / 4:

        transformer(hidden_states=pack(x),                   # (B, h/2 * w/2, 4C)
                    timestep=timestep.to(x.dtype) / 1000,    # sigma; the model multiplies by 1000 again
                    guidance=1 + w,                          # (B,) float32 guidance scale, config.guidance_embeds only
                    pooled_projections=cond.pooled,          # CLIP pooler_output
                    encoder_hidden_states=cond.embeds,       # T5 last hidden state (B, 512, D)
                    txt_ids=zeros(L, 3), img_ids=[0, row, col] of the packed grid)   -> unpacked to (B, C, h, w)

    `guidance` is the Denoiser's w, stepdistill's one guidance convention (LCM's: w = guidance_scale - 1, what the
    objectives pass a guidance-input student and what a spec's guidance_scale = 1 + w undoes): the network gets
    FluxPipeline's guidance_scale = 1 + w. For a guidance-embedding network (Flux-dev), guidance None means the
    pipeline's default guidance_scale DEFAULT_GUIDANCE = 3.5 (what a user's plain pipeline call gives it); a
    network without the embedding (schnell) ignores it. No classifier-free guidance batch: FluxPipeline runs a
    second, negative-prompt call only with true_cfg_scale > 1.
    Packing makes the token grid h/2 x w/2, so `downsampling` is 2 and the dynamic shift's image_seq_len (Teacher.
    at_resolution, FluxPipeline's mu) is (h/2) * (w/2). Both block types return (encoder_hidden_states,
    hidden_states): a tap's map is its image stream on the packed grid, (B, inner_dim, h/2, w/2).
    """

    kind = "flux"
    network_class = "FluxTransformer2DModel"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline")
    DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale
    MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s max_sequence_length
    # Attention and feed-forward projections of both block types (diffusers' Flux DreamBooth LoRA targets plus the
    # single blocks' proj_mlp / proj_out). "proj_out" also matches the network's final output projection.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
    kohya_prefix = "lora_unet_"  # sd-scripts' Flux keys: lora_unet_ + the BFL module name (bfl_linears)
    kohya_readers = "ComfyUI and Forge (sd-scripts / BFL module names)"

    def predict(self, net, module, x, timestep, cond, guidance):
        b, _, h, w = x.shape
        if module.config.guidance_embeds:
            scale = self.DEFAULT_GUIDANCE if guidance is None else 1.0 + torch.as_tensor(guidance).float()
            guidance = torch.as_tensor(scale, dtype=torch.float32, device=x.device).expand(b)
        else:
            guidance = None
        out = net(hidden_states=pack_latents(x), timestep=timestep.to(device=x.device, dtype=x.dtype) / 1000,
                  guidance=guidance, pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                  txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                  img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    def guidance_input(self, module):
        return "scale" if module.config.guidance_embeds else None

    def latent_channels(self, module):
        return int(module.config.in_channels) // 4

    def downsampling(self, module):
        return 2

    def feature_taps(self, module):
        """A quarter, half, three quarters and the end of the depth, double blocks then single blocks."""
        blocks = [f"transformer_blocks.{i}" for i in range(len(module.transformer_blocks))]
        blocks += [f"single_transformer_blocks.{i}" for i in range(len(module.single_transformer_blocks))]
        n = len(blocks)
        return [blocks[i] for i in sorted({n // 4, n // 2, 3 * n // 4, n - 1})]

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None,
                                               device=next(pipe.text_encoder_2.parameters()).device,
                                               max_sequence_length=self.MAX_SEQUENCE_LENGTH)
        return Conditioning(embeds.float(), pooled.float())

    def pipeline_latents(self, latents):
        return pack_latents(latents)

    def kohya_state_dict(self, net, adapter):
        """The adapter as an sd-scripts Flux LoRA file: `lora_unet_<BFL name>` keys (`bfl_linears`). A BFL linear
        that fuses several diffusers linears gets one LoRA that is exactly the sum of theirs: lora_down the parts'
        A stacked (rank n r), lora_up their B block-diagonal, alpha n alpha (alpha / rank stays each part's scale);
        a part the student does not train is a zero block. Parts must share rank and scale (one student.lora_rank
        and lora_alpha make them so). A LoRA on a module that has no BFL name is refused, not dropped."""
        from peft.tuners.lora import LoraLayer

        layers = {n: m for n, m in net.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}
        if not layers:
            raise StepdistillError("the student has no LoRA adapter to export; use --format full")
        out, used = {}, set()
        for bfl, parts in bfl_linears(net).items():
            trained = [p for p in parts if p in layers]
            if not trained:
                continue
            ranks = {layers[p].r[adapter] for p in trained}
            scales = {float(layers[p].scaling[adapter]) for p in trained}
            if len(ranks) > 1 or len(scales) > 1:
                raise StepdistillError(f"the LoRA parts of Flux's fused {bfl} ({', '.join(trained)}) have different "
                                       f"ranks or alphas, which one kohya LoRA cannot hold; train them with one "
                                       f"student.lora_rank and lora_alpha")
            (r,), (scale,) = ranks, scales
            downs, ups = [], []
            for p in parts:
                if p in layers:
                    downs.append(layers[p].lora_A[adapter].weight.detach().float().cpu())
                    ups.append(layers[p].lora_B[adapter].weight.detach().float().cpu())
                else:  # not trained: a zero block (the same output rows, no change)
                    lin = net.get_submodule(p)
                    lin = getattr(lin, "base_layer", lin)
                    downs.append(torch.zeros(r, lin.in_features))
                    ups.append(torch.zeros(lin.out_features, r))
            down, up = torch.cat(downs), torch.block_diag(*ups)
            rank = down.shape[0]
            alpha = float(layers[trained[0]].lora_alpha[adapter])
            alpha = alpha * len(parts) if scale == alpha / r else scale * rank  # rsLoRA: alpha / sqrt(r)
            if bfl in _FOLDED_SCALE:
                up, alpha = up * scale, float(rank)
            if bfl == "final_layer_adaLN_modulation_1":  # diffusers (scale, shift) -> BFL (shift, scale)
                up = torch.cat(up.chunk(2)[::-1])
            key = self.kohya_prefix + bfl
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha)
            used.update(trained)
        if missing := sorted(set(layers) - used):
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise StepdistillError(f"the student's LoRA on '{missing[0]}'{more} has no counterpart in Flux's BFL "
                                   "module names, which a kohya LoRA file uses; drop it from student.lora_targets")
        return out
