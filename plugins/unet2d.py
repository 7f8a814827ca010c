"""Predictor ``unet2d``: diffusers' ``UNet2DModel`` with sinusoidal time embeddings.

With no ``block_out_channels`` given it builds the seed report's shapes: at 32×32,
5 down/up blocks; at 64×64, 6; 2 residual layers per block; self-attention at
16×16 (the seed does not state widths; ours are listed in ``SEED_WIDTHS``).
"""

import attrs
import torch

import ddpmkit

SEED_WIDTHS = {32: (64, 128, 128, 256, 256), 64: (64, 64, 128, 128, 256, 256)}


@attrs.define
class UNet2DConfig:
    """Options of ``unet2d``.

    block_out_channels: width of each resolution level, one entry per down/up
        block; each level but the last halves the resolution. Default: the
        seed's shape for the dataset's resolution (5 blocks at 32, 6 at 64).
    layers_per_block: residual layers per block. Default 2.
    attention_resolutions: feature-map sides that get self-attention. Default (16,).
    dropout: dropout probability in the residual layers, in [0, 1). Default 0.0
        (the seed's presets use 0.01).
    norm_num_groups: GroupNorm groups; must divide every width. Default 32.
    attention_head_dim: channels per attention head. Default 8.
    learn_variance: also output the improved-DDPM variance interpolation (2C output channels; run
        with ``--variance learned_range``). Default False.
    patch_size: a space-to-depth stem: the U-Net sees each p×p patch as p² channels
        (``pixel_unshuffle``), works at resolution/p, and ``pixel_shuffle`` maps its output back; a
        28×28 image costs about what a 14×14 one does. Default 1 (off).
    pad: pixels of zeros added on every side before the stem and cropped from the output, so that a
        side the levels cannot halve works at one they can (28 + 2·2 = 32: patch_size 2 → 16 → 8 → 4).
        Default 0.
    """

    block_out_channels: tuple[int, ...] | None = attrs.field(default=None)
    layers_per_block: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    attention_resolutions: tuple[int, ...] = attrs.field(default=(16,), converter=tuple)
    dropout: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)])
    norm_num_groups: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    attention_head_dim: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    learn_variance: bool = False
    patch_size: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    pad: int = attrs.field(default=0, validator=attrs.validators.ge(0))


class UNet2D(torch.nn.Module):
    """ε_θ(x_t, t) = UNet2DModel(x_t, t).sample; with ``num_classes`` (a class-conditional run) a
    class embedding of K + 1 entries (the last one free for a "no class" label) is added to the time
    embedding, as diffusers' ``num_class_embeds`` does, and ``forward`` takes ``class_labels``."""

    def __init__(self, config: UNet2DConfig, *, channels: int, resolution: int, num_classes: int | None = None):
        super().__init__()
        self.conditions = ("class_labels",) if num_classes else ()
        self.outputs = ("prediction", "variance") if config.learn_variance else ("prediction",)
        from diffusers import UNet2DModel

        p = self.patch_size = config.patch_size
        self.pad = config.pad
        padded = resolution + 2 * config.pad
        if padded % p:
            raise ddpmkit.DdpmkitError(f"unet2d patch_size={p} must divide the resolution {padded}"
                                       + (f" ({resolution} + 2·pad)" if config.pad else ""))
        full, resolution, channels_in = padded, padded // p, channels * p * p
        widths = config.block_out_channels
        if widths is None:
            if resolution not in SEED_WIDTHS:
                raise ddpmkit.DdpmkitError(
                    f"unet2d has seed shapes for resolution 32 and 64, not {resolution}; "
                    "set predictor.block_out_channels=..."
                )
            widths = SEED_WIDTHS[resolution]
        widths = tuple(int(w) for w in widths)
        if resolution % (2 ** (len(widths) - 1)):
            inside = f" ({full}/{p} inside the patch_size={p} stem)" if p > 1 else ""
            raise ddpmkit.DdpmkitError(
                f"unet2d with {len(widths)} blocks needs a resolution divisible by {2 ** (len(widths) - 1)}, "
                f"got {resolution}{inside}"
            )
        bad = [w for w in widths if w % config.norm_num_groups]
        if bad:
            raise ddpmkit.DdpmkitError(f"unet2d widths {bad} are not divisible by norm_num_groups={config.norm_num_groups}")
        sides = [resolution // 2**i for i in range(len(widths))]
        attn = [side in config.attention_resolutions for side in sides]
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
        self.unet = UNet2DModel(
            sample_size=resolution, in_channels=channels_in, out_channels=channels_in * len(self.outputs),
            block_out_channels=widths, layers_per_block=config.layers_per_block,
            down_block_types=down, up_block_types=up, dropout=config.dropout,
            norm_num_groups=config.norm_num_groups, attention_head_dim=config.attention_head_dim,
            time_embedding_type="positional", num_class_embeds=num_classes + 1 if num_classes else None,
        )

    @property
    def stem(self) -> dict[str, int]:
        """The space-to-depth stem's settings (``patch_size``, ``pad``) when there is one, else ``{}``: with a
        stem the wrapped ``unet`` alone is not the predictor (export to diffusers refuses it)."""
        return {"patch_size": self.patch_size, "pad": self.pad} if self.patch_size > 1 or self.pad else {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.stem:
            return self.unet(x, t, class_labels=class_labels).sample
        k, F = self.pad, torch.nn.functional
        h = F.pad(x, (k, k, k, k)) if k else x
        # (B, C, H, W) → (B, C·p², H/p, W/p) → U-Net → back; pixel_shuffle keeps each output channel's p² maps
        # together, so the prediction's C channels come before the variance's.
        h = F.pixel_shuffle(self.unet(F.pixel_unshuffle(h, self.patch_size), t, class_labels=class_labels).sample,
                            self.patch_size)
        return h[..., k:h.shape[-2] - k, k:h.shape[-1] - k] if k else h


@ddpmkit.hookimpl
def register_predictors(register):
    register("unet2d", UNet2D, UNet2DConfig, "diffusers UNet2DModel, sinusoidal time embedding (seed shapes)")
