"""Models: energy networks (explicit and DEQ) and the paper's experiment models."""
