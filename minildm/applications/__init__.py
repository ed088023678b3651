"""Stage 10: applications of a trained latent diffusion model (notebook 10).

- `editing`: with any trained denoiser, no retraining: inpainting by replacement (optionally with RePaint's
  resampling) and image-to-image (SDEdit).
- `conditioned`: models that see an extra image by concatenation (LDM Sec. 3.3 and 4.4-4.5): mask-conditioned
  inpainting, super-resolution, layout (semantic map) to image; their recipes, training and scores.
"""

from minildm.applications.editing import (
    check_guidance,
    check_mask,
    check_prompts,
    check_strength,
    img2img,
    inpaint,
    latent_mask,
    paste_known,
    repaint_path,
    sdedit_timesteps,
)

__all__ = ["check_guidance", "check_mask", "check_prompts", "check_strength", "img2img", "inpaint", "latent_mask",
           "paste_known", "repaint_path", "sdedit_timesteps"]
