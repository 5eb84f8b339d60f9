"""Model integrations (Hugging Face transformers attention backends)."""
