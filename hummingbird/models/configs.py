"""Named U-Net configurations (keyword arguments of HummingbirdUNet3DModel).

The real ones reproduce the parameter counts in the design notes, which is the check that the
architecture matches: videocrafter2 1413.3M, hummingbird-0.9b 945.2M (945.1M + time_cond_proj),
hummingbird-0.7b 772.1M (772.0M + time_cond_proj; no middle block).
"""

VIDEOCRAFTER2 = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attention_levels=[0, 1, 2],
    attention_head_dim=64,
    context_dim=1024,
    transformer_depth=1,
    temporal_transformer_depth=1,
    norm_num_groups=32,
    dropout=0.0,
    temporal_conv_dropout=0.1,
    init_attn_heads=8,
    fps_cond=True,
    use_middle_block=True,
    time_cond_proj_dim=None,
)

CONFIGS = {
    "videocrafter2": VIDEOCRAFTER2,
    # Hummingbird prunes by depth (one ResBlock per level instead of two) and distils the
    # classifier-free guidance scale in through time_cond_proj.
    "hummingbird-0.9b": {**VIDEOCRAFTER2, "num_res_blocks": 1, "time_cond_proj_dim": 256},
    "hummingbird-0.7b": {**VIDEOCRAFTER2, "num_res_blocks": 1, "time_cond_proj_dim": 256, "use_middle_block": False},
    # For tests: VideoCrafter2's structure (two ResBlocks per level, middle block, init attention,
    # fps and guidance conditioning) at 3.6M parameters.
    "tiny": {
        **VIDEOCRAFTER2,
        "model_channels": 16,
        "attention_head_dim": 8,
        "context_dim": 32,
        "norm_num_groups": 4,
        "time_cond_proj_dim": 16,
    },
}
