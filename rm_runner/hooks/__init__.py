"""Unchanged Hugging Face code on any device: the device controller and the transformers hook."""
