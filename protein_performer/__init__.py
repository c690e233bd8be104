"""protein_performer: protein language models with Performers (FAVOR+ linear attention)."""

__version__ = "0.1.0"
