"""Stage 10: applications of a trained latent diffusion model (notebook 10).

- `editing`: with any trained denoiser, no retraining: inpainting by replacement (optionally with RePaint's
  resampling) and image-to-image (SDEdit).
- `conditioned`: models that see an extra image by concatenation (LDM Sec. 3.3 and 4.4-4.5): mask-conditioned
  inpainting, super-resolution, layout (semantic map) to image; their recipes and training.
- `scores`: one number per application, read by the Shapes judge (stage 7): inside and outside an inpainted hole,
  layout accuracy; super-resolution is scored by PSNR (`minildm.metrics.psnr`) against bicubic upsampling.
"""

from minildm.applications.conditioned import (
    CONDITION_DROP,
    KINDS,
    bicubic_upsample,
    captionless_batches,
    concat_recipe,
    condition_channels,
    inpaint_with_model,
    inpainting_condition,
    layout_condition,
    layout_to_image,
    low_resolution,
    make_condition,
    random_box_masks,
    sample_concat,
    super_resolve,
    train_concat,
)
from minildm.applications.editing import (
    check_guidance,
    check_mask,
    check_prompts,
    check_strength,
    img2img,
    img2img_images,
    inpaint,
    inpaint_images,
    latent_mask,
    paste_known,
    repaint_path,
    sdedit_timesteps,
)
from minildm.applications.scores import cell_masks, inpainting_accuracy, layout_accuracy

__all__ = ["CONDITION_DROP", "KINDS", "bicubic_upsample", "captionless_batches", "cell_masks",
           "check_guidance", "check_mask", "check_prompts", "check_strength", "concat_recipe",
           "condition_channels", "img2img", "img2img_images", "inpaint", "inpaint_images",
           "inpaint_with_model", "inpainting_accuracy", "inpainting_condition", "latent_mask",
           "layout_accuracy", "layout_condition", "layout_to_image", "low_resolution", "make_condition",
           "paste_known", "random_box_masks", "repaint_path", "sample_concat", "sdedit_timesteps",
           "super_resolve", "train_concat"]
