"""Serving: the OpenAI-compatible HTTP server (`qwenvl serve`) over the engine, and its media rules."""
