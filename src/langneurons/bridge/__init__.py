"""Bridge-language selection for BridgeX-ICL (Xu et al. 2025, arXiv 2508.17078).

Submodules:

* :mod:`langneurons.bridge.hsic` -- HSIC between per-neuron activation kernels and the
  per-layer bridge score built from it (METHODS.md, section 6).
"""
