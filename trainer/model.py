"""MAE-style masked image modeling on any timm ViT, with K-MIM token targets or MAE pixel targets.

Methods are named by stage, as in MAE's `models_mae.py`: `patchify`, `random_masking`,
`forward_encoder`, `forward_decoder`, `forward_loss`; `forward` returns the loss.
"""

from __future__ import annotations

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from kmim.contract.patches import patchify
from kmim.contract.views import IMAGENET_MEAN, IMAGENET_STD
from kmim.errors import ConfigError
from kmim.trainer.config import ModelConfig

# timm reads a module's `default_cfgs` when registering its models.
default_cfgs = generate_default_cfgs(
    {
        "vit_micro_patch4_32": {
            "input_size": (3, 32, 32),
            "num_classes": 0,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        }
    }
)


@register_model
def vit_micro_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny ViT for tests and the digits recipe: 32 px, 4 px patches, 4 blocks of width 64."""
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    return timm.models.vision_transformer._create_vision_transformer(
        "vit_micro_patch4_32", pretrained=pretrained, **dict(args, **kwargs)
    )


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [grid*grid, dim] (MAE's decoder embedding)."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()


def build_encoder(cfg: ModelConfig) -> VisionTransformer:
    try:
        encoder = timm.create_model(
            cfg.encoder,
            pretrained=False,
            num_classes=0,
            img_size=cfg.image_size,
            drop_path_rate=cfg.drop_path,
        )
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model.encoder {cfg.encoder!r}: cannot build it with timm ({e})") from None
    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"model.encoder {cfg.encoder!r} is not a timm VisionTransformer")
    patch = encoder.patch_embed.patch_size[0]
    if patch != cfg.patch_size:
        raise ConfigError(
            f"model.encoder {cfg.encoder!r} has patch size {patch}, model.patch_size is {cfg.patch_size}"
        )
    return encoder


class MaskedImageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, num_tokens: int | None):
        super().__init__()
        if cfg.target in ("tokens", "online") and not num_tokens:
            raise ConfigError("token targets need the codebook size K")
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.grid = cfg.image_size // cfg.patch_size
        width, dec = self.encoder.embed_dim, cfg.decoder_embed_dim
        self.num_prefix = self.encoder.num_prefix_tokens
        self.decoder_embed = nn.Linear(width, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.register_buffer(
            "decoder_pos_embed",
            torch.cat([torch.zeros(self.num_prefix, dec), sincos_pos_embed(dec, self.grid)]).unsqueeze(0),
            persistent=False,
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(dec, cfg.decoder_num_heads, mlp_ratio=4.0, qkv_bias=True)
                for _ in range(cfg.decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(dec)
        out = num_tokens if cfg.target in ("tokens", "online") else cfg.patch_size**2 * 3
        self.decoder_pred = nn.Linear(dec, out)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules(), self.decoder_norm]:
            self._init(m)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, 3, H, W] -> [N, L, p*p*3] in the project's one patch order."""
        return patchify(imgs, self.cfg.patch_size)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """Keep a random (1 - mask_ratio) of the patches of each sample, by sorting uniform noise.

        x [N, L, D] -> kept [N, L_keep, D], mask [N, L] (1 = masked), ids_restore [N, L].
        """
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, generator=generator, device="cpu").to(x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ):
        """imgs [N, 3, H, W] -> latent [N, P + L_keep, D], mask [N, L], ids_restore [N, L]."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # [N, L, D], or [N, h, w, D] for models built with dynamic_img_size
        if x.dim() == 4:
            x = x.flatten(1, 2)
        pos = enc.pos_embed  # [1, P + L, D], or [1, L, D] when the prefix tokens carry no position
        if enc.no_embed_class:
            x, prefix_pos = x + pos, 0
        else:
            x, prefix_pos = x + pos[:, self.num_prefix :], pos[:, : self.num_prefix]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        prefix = [t.expand(len(x), -1, -1) for t in (enc.cls_token, enc.reg_token) if t is not None]
        if prefix:
            x = torch.cat([torch.cat(prefix, dim=1) + prefix_pos, x], dim=1)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, P + L_keep, D] -> predictions [N, L, K or p*p*3] for every patch."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        prefix, kept = x[:, : self.num_prefix], x[:, self.num_prefix :]
        masked = self.mask_token.expand(n, length - kept.shape[1], -1)
        full = torch.cat([kept, masked], dim=1)
        full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([prefix, full], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, self.num_prefix :]

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None
    ):
        """Mean loss over masked patches: cross-entropy on token ids, or MSE on (normalised) pixels."""
        if self.cfg.target in ("tokens", "online"):
            ce = F.cross_entropy(
                pred.flatten(0, 1).float(),
                tokens.flatten().long(),
                reduction="none",
                label_smoothing=self.cfg.label_smoothing,
            )
            return (ce * mask.flatten()).sum() / mask.sum()
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, tokens: torch.Tensor | None = None, generator: torch.Generator | None = None
    ):
        latent, mask, ids_restore = self.forward_encoder(imgs, self.cfg.mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask, tokens)
