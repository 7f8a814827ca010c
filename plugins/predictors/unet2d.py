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
        28×28 image costs about what a 14×14 one does. ``None``: chosen for the dataset's resolution
        R (see :func:`fit_stem`): 1 up to 16×16, else the smallest power of two that brings R to ≤ 16.
        Default 1 (off).
    pad: pixels of zeros added on every side before the stem and cropped from the output, so that a
        side the levels cannot halve works at one they can (28 + 2·2 = 32: patch_size 2 → 16 → 8 → 4).
        ``None``: the least padding that lets every level halve (split between the sides, one more
        at the bottom/right for an odd side). Default 0.
    """

    block_out_channels: tuple[int, ...] | None = attrs.field(default=None)
    layers_per_block: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    attention_resolutions: tuple[int, ...] = attrs.field(default=(16,), converter=tuple)
    dropout: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)])
    norm_num_groups: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    attention_head_dim: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    learn_variance: bool = False
    patch_size: int | None = attrs.field(default=1, validator=attrs.validators.optional(attrs.validators.ge(1)))
    pad: int | None = attrs.field(default=0, validator=attrs.validators.optional(attrs.validators.ge(0)))


def fit_stem(resolution: int, levels: int, patch_size: int | None, pad: int | None) -> tuple[int, int, int]:
    """The stem for a ``resolution``×``resolution`` image and a U-Net of ``levels`` levels: ``(p, lo, hi)``,
    the patch size and the zeros added before (top/left) and after (bottom/right). ``None`` for
    ``patch_size`` or ``pad`` means "choose": p = 1 up to 16×16, else the smallest power of two with
    R/p ≤ 16 (the cost of a 16×16 U-Net); the padding the least that makes R + padding divisible by
    p·2^(levels−1). A given ``pad`` is put on every side."""
    p = patch_size
    if p is None:
        p = 1
        while resolution / p > 16:
            p *= 2
    if pad is not None:
        return p, pad, pad
    multiple = p * 2 ** (levels - 1)
    total = -resolution % multiple
    return p, total // 2, total - total // 2


def describe_stem(resolution: int, p: int, lo: int, hi: int) -> str:
    """One line: what the stem does at this resolution (the run prints it when the stem was chosen)."""
    side = (resolution + lo + hi) // p
    if p == 1 and not lo + hi:
        return f"{resolution}×{resolution} images: no stem"
    pad = "" if not lo + hi else (f", {lo} pixels of padding" if lo == hi else f", {lo}+{hi} pixels of padding")
    stem = f"{'an' if p == 8 else 'a'} {p}×{p} space-to-depth stem" if p > 1 else "no stem"
    return f"{resolution}×{resolution} images: {stem}{pad} ({side}×{side} inside the U-Net)"


class UNet2D(torch.nn.Module):
    """ε_θ(x_t, t) = UNet2DModel(x_t, t).sample; with ``num_classes`` (a class-conditional run) a
    class embedding of K + 1 entries (the last one free for a "no class" label) is added to the time
    embedding, as diffusers' ``num_class_embeds`` does, and ``forward`` takes ``class_labels``."""

    def __init__(self, config: UNet2DConfig, *, channels: int, resolution: int, num_classes: int | None = None):
        super().__init__()
        self.conditions = ("class_labels",) if num_classes else ()
        self.outputs = ("prediction", "variance") if config.learn_variance else ("prediction",)
        from diffusers import UNet2DModel

        widths = config.block_out_channels
        levels = len(widths) if widths is not None else len(SEED_WIDTHS.get(resolution, (0,)))
        # with the seed's widths (chosen by resolution) a stem is never chosen, only padding
        patch = 1 if config.patch_size is None and widths is None else config.patch_size
        p, lo, hi = fit_stem(resolution, levels, patch, config.pad)
        self.patch_size, self.pad, self.pad_end = p, lo, hi
        chosen = config.patch_size is None or config.pad is None
        # what the run prints about this predictor (ddpmkit prints a predictor's ``notes``)
        self.notes = (describe_stem(resolution, p, lo, hi),) if chosen else ()
        padded = resolution + lo + hi
        if padded % p:
            raise ddpmkit.DdpmkitError(f"unet2d patch_size={p} must divide the resolution {padded}"
                                       + (f" ({resolution} + 2·pad)" if lo else "")
                                       + "; set predictor.patch_size and predictor.pad to fit, or to none (chosen for the data)")
        full, resolution, channels_in = padded, padded // p, channels * p * p
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
                f"got {resolution}{inside}; set predictor.pad=none and predictor.patch_size=none (chosen for the "
                "data), or fewer predictor.block_out_channels"
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
        if self.patch_size == 1 and not self.pad + self.pad_end:
            return {}
        stem = {"patch_size": self.patch_size, "pad": self.pad}
        return stem if self.pad_end == self.pad else {**stem, "pad_end": self.pad_end}

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.stem:
            return self.unet(x, t, class_labels=class_labels).sample
        k, e, F = self.pad, self.pad_end, torch.nn.functional
        h = F.pad(x, (k, e, k, e)) if k or e else x
        # (B, C, H, W) → (B, C·p², H/p, W/p) → U-Net → back; pixel_shuffle keeps each output channel's p² maps
        # together, so the prediction's C channels come before the variance's.
        h = F.pixel_shuffle(self.unet(F.pixel_unshuffle(h, self.patch_size), t, class_labels=class_labels).sample,
                            self.patch_size)
        return h[..., k:h.shape[-2] - e, k:h.shape[-1] - e] if k or e else h


@ddpmkit.hookimpl
def register_predictors(register):
    register("unet2d", UNet2D, UNet2DConfig, "diffusers UNet2DModel, sinusoidal time embedding (seed shapes)")
