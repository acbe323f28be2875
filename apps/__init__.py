"""The chat app behind `mm1-mlx app`: a local web page and an OpenAI-compatible API."""
