"""Watermarking, C2PA signing, metadata and image saving."""
