"""Pipelines that compose the `wan` modules into text/image-to-video generation."""
