"""The real vLLM, driven as an OpenAI-compatible server: launcher, model folders, metrics scraping."""
