"""Data: sources, validation, id mapping, splitting and partitioning into clients."""
