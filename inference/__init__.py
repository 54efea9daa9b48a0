"""Talking to the OPAL model: the one prompt module, image checks, output parsing and
normalisation, and the async OpenAI-compatible client for vLLM endpoints.

Shared by the stream side (workers) and the model side (training, judge): imports
only schemas, pydantic, httpx, Pillow and the standard library.
"""
