"""dagcli: align text-to-image diffusion models to black-box rewards with GFlowNets (DAG)."""

__version__ = "0.1.0"
