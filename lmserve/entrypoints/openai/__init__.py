"""The OpenAI-compatible HTTP server (`lmserve serve`)."""
