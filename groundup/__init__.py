"""groundup: the "Building LLMs from the Ground Up" workshop as an orchestrated, tracked pipeline."""

__version__ = "0.1.0"
