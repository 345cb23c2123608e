"""Masked diffusion LMs: the MDLM objective, denoisers over any masked LM, one registry of samplers (MDLM,
LLaDA, ReMDM, Star+, confidence star, G-Star), G-Star's learned remasker, and evaluation."""

from interlayer.diffusion.denoiser import Denoiser, load_denoiser
from interlayer.diffusion.evaluate import cell_metrics, evaluate_grid
from interlayer.diffusion.remasker import Remasker, RemaskerConfig, load_remasker
from interlayer.diffusion.samplers import SAMPLERS, SamplerConfig, SampleResult, sample
from interlayer.diffusion.schedule import LogLinearSchedule, mdlm_loss
from interlayer.diffusion.templates import build_templates, decode_samples
from interlayer.diffusion.train import DenoiserTrainConfig, train_denoiser, train_remasker

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "DenoiserTrainConfig",
    "LogLinearSchedule",
    "Remasker",
    "RemaskerConfig",
    "SampleResult",
    "SamplerConfig",
    "build_templates",
    "cell_metrics",
    "decode_samples",
    "evaluate_grid",
    "load_denoiser",
    "load_remasker",
    "mdlm_loss",
    "sample",
    "train_denoiser",
    "train_remasker",
]
