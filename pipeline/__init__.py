"""Visual document retrieval pipeline: ColQwen2 corpus embedding and MaxSim scoring on Ray."""

__version__ = "0.1.0"
