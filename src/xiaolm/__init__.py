"""xiaolm (小LM): raw Chinese text to a small Chinese language model you can chat with."""
__version__ = "0.1.0"
