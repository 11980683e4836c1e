"""distft: distributed fine-tuning of Llama-family models on Ray Train."""

__version__ = "0.1.0"
