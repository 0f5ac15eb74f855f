"""pl_i2f: training with privacy defenses while measuring gradient leakage with the Inversion Influence Function."""

from pl_i2f.errors import ConfigError, DataUnavailableError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataUnavailableError", "__version__"]
