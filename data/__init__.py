"""Video decoding, clip sampling, datasets and samplers."""
