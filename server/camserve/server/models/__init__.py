"""Model loading and the registry of hosted models."""
