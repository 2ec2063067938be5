"""Streaming VAE decoding: pixels for latent frames as a causal generator produces them.

The decoder is causal in time, so a video's latents can be decoded a chunk at a time as long as the
decoder's feature cache carries over between chunks; the frames that come out, concatenated, equal
`vae.decode` of all the latents at once.

    stream = StreamingDecoder(vae)
    for latents in generator:          # e.g. [B, z_dim, 3, h, w] per block
        show(stream.decode(latents))   # [B, 3, 1 + 4*2 frames for the first block, then 4*3, H, W]
"""

from wan.modules.vae_layers import DEFAULT_TILE_OVERLAP, DEFAULT_TILE_SIZE


class StreamingDecoder:
    """Decodes one video's normalized latents chunk by chunk with either Wan VAE.

    The first latent frame of the video gives one pixel frame, every later one `vae.temporal_stride`
    frames. `tiled` etc. as in `vae.decode`; with tiling each tile keeps its own cache. Call `reset()`
    (or make a new decoder) before starting another video.
    """

    def __init__(self, vae, tiled=False, tile_size=DEFAULT_TILE_SIZE, tile_overlap=DEFAULT_TILE_OVERLAP,
                 clamp=True):
        self.vae = vae
        self.tiling = dict(tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap)
        self.clamp = clamp
        self.reset()

    def reset(self):
        self.cache = {}

    def decode(self, latents):
        """latents [B, z_dim, t, h, w] continuing the video -> pixel frames [B, 3, t', H, W] (float32)."""
        video = self.vae.decode_frames(latents, self.cache, **self.tiling)
        return video.clamp_(-1, 1) if self.clamp else video
