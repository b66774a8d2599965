"""emloop pipeline core: the science (volumes, montage, alignment, FFN, metrics) and the record (catalog)."""

__version__ = "0.1.0"
