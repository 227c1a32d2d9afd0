"""Shared foundation: settings, output paths, atomic writes, logging and the cluster environment."""
