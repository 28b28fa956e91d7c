"""scfm: a scFoundation-style single-cell foundation model, from a laptop to a Slurm cluster."""

__version__ = "0.1.0"
