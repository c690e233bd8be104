"""Data layer: tokenizer, streaming FASTA reader, FASTA -> sharded HDF5 ingestion, reader, DataModule."""
