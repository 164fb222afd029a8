"""Image restoration: the U-Net denoiser (network, evaluation report, inference) and restoration augmentation.

Modules:
    networks: :class:`~pipelines.restoration.networks.DenoisingUNet` (MONAI BasicUNet, optionally residual).
    data: data lists for denoising (every image at every noise level).
    report: PSNR / SSIM per noise level with bootstrap CIs, and the evaluation handler of the denoiser bundle.
    denoise: loading a trained denoiser (TorchScript or state dict + bundle config) and denoising files.
    augment: ``python -m pipelines restore-augment``: restored copies of one class until a target class ratio.
"""
