"""UNet configs at the real sizes of SD1.5, SDXL and SVD, for layout checks (built on the meta
device) and benchmarks (random weights at real sizes). No downloads; diffusers is not imported.

``REAL_UNETS[family] = (diffusers class name, config overrides)``; the SVD entry is empty because
``UNetSpatioTemporalConditionModel``'s defaults are SVD's sizes.
"""

from __future__ import annotations

from typing import Any

REAL_UNETS: dict[str, tuple[str, dict[str, Any]]] = {
    "sd15": (
        "UNet2DConditionModel",
        {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        },
    ),
    "sdxl": (
        "UNet2DConditionModel",
        {
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 2048,
            "attention_head_dim": (5, 10, 20),
            "transformer_layers_per_block": (1, 2, 10),
            "use_linear_projection": True,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
    ),
    "svd": ("UNetSpatioTemporalConditionModel", {}),  # the diffusers defaults are SVD's sizes
}
