"""Schedules, noise, reference packing, the denoising loop and the pipeline."""
