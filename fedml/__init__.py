"""fedml: federated, differentially private recommenders for a shopping guide.

The library computes; the Prefect flows in ``flows/`` orchestrate and record (MLflow).
"""

__version__ = "0.1.0"
