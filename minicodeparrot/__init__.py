"""minicodeparrot: CodeParrot (GPT-2 trained from scratch on Python code) in pure PyTorch."""

__version__ = "0.1.0"
