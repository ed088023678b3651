"""minildm: latent diffusion from scratch, one stage per notebook.

Stages (one module each, data flowing one way):
data -> autoencoder -> schedules/unet/diffusion -> samplers -> applications -> metrics.
"""

__version__ = "0.1.0"
