"""Input pipelines: one module per backend behind the Batch contract (mixmask/batch.py)."""
