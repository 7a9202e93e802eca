"""The helpers package of the YOLOv10 low-bit scripts: each module does one job, named in its docstring (the
README's layout section maps the card's steps to scripts and modules)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
