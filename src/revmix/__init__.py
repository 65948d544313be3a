"""revmix: scalable sweeps and fine-tuning objectives for forward/reverse reasoning data."""

__version__ = "0.1.0"
