"""Dataset model, loaders for raw sources and the synthetic generator."""
