"""`pasta serve`: an OpenAI-compatible server with continuous batching (see app.py)."""
