"""fastclass: a class list in, a clean versioned image dataset and a trained classifier out."""
__version__ = "0.1.0"
