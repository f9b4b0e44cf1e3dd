"""Tiny random pipelines for tests and demos: the whole text-to-video path in milliseconds, offline.

Output is noise; what they check is plumbing (shapes, samplers, saving/loading, export).
"""
import torch
from diffusers import AutoencoderKL
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hummingbird.models import HummingbirdUNet3DModel
from hummingbird.pipeline import HummingbirdPipeline
from hummingbird.schedulers import ddim_scheduler, lcm_scheduler

HIDDEN = 32  # text width = the "tiny" U-Net's context_dim


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer without merges: every character is a token (its 256 byte-level symbols,
    word-final forms with ``</w>``, and the two special tokens), so any text tokenizes, no files needed."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_random_pipeline(scheduler: str = "lcm", seed: int = 0) -> HummingbirdPipeline:
    """``"lcm"``: Hummingbird-like (U-Net with time_cond_proj, LCM). ``"ddim"``: VideoCrafter2-like
    (no time_cond_proj, DDIM + classifier-free guidance). Height/width: multiples of 16."""
    if scheduler not in ("lcm", "ddim"):
        raise ValueError(f"scheduler must be 'lcm' or 'ddim', got {scheduler!r}")
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=HIDDEN,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKL(  # 4 levels: downsamples by 8 like SD's KL-f8
            block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
            sample_size=32, scaling_factor=0.18215,
        )
        # Two levels (one downsampling) instead of four, so 32x32 videos (4x4 latents) work.
        unet = HummingbirdUNet3DModel.from_named_config(
            "tiny", channel_mult=(1, 2), attention_levels=(0, 1), time_cond_proj_dim=16 if scheduler == "lcm" else None,
        )
        # Zero-initialised output layers would make a fresh U-Net predict exactly 0, hiding wiring bugs.
        for p in unet.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.1)
    return HummingbirdPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                               scheduler=lcm_scheduler() if scheduler == "lcm" else ddim_scheduler())
