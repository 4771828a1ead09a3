"""Embeddings computed by pools of OpenAI-compatible inference servers instead of the proxy's CPU."""
