"""loyalty: a rules-driven campaign engine for loyalty and retention programmes."""

__version__ = "0.1.0"
